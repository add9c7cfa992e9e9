"""A pre-training run (``launch/pretrain.py``, one process) on a corpus with faulty shards:

* a dev shard deleted and another cut short: validation skips them and counts the missing
  samples (``val_skipped_samples_*``) instead of aborting ("No such file ... dev-000000.tar");
* a train shard holding fewer samples than its manifest entry says, drawn again and again by
  the resampled stream: its missing samples are counted and logged once, not on every draw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reolm.data.shards import iter_tar_samples, load_manifest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _cut_half(path: Path) -> int:
    """Cut a tar at a block boundary half-way (tarfile sees a clean end); returns samples left."""
    data = path.read_bytes()
    path.write_bytes(data[:(len(data) // 2) // 512 * 512])
    return sum(1 for _ in iter_tar_samples(path))


def test_run_skips_missing_dev_shard_and_counts_short_shards_once(tmp_path):
    from reolm.random_init import prepare_synthetic_inputs

    inputs = prepare_synthetic_inputs(tmp_path / "inputs", "tiny", vocab_size=300, backbone_size="tiny")
    corpus = inputs["corpus"]
    manifest = load_manifest(corpus)
    dev = manifest["shards"]["dev"]
    (corpus / dev[0]["path"]).unlink()
    left = _cut_half(corpus / dev[1]["path"])
    dev_missing = dev[0]["count"] + dev[1]["count"] - left
    train0 = manifest["shards"]["train"][0]
    train0["count"] += 7  # the manifest promises 7 samples the shard does not hold
    (corpus / "manifest.json").write_text(json.dumps(manifest))

    run_dir = tmp_path / "run"
    overrides = {"data.corpus": corpus, "model.backbone": inputs["backbone"], "run_dir": run_dir,
                 # only the short shard: every draw of the resampled stream reads it again
                 "data.train_shards": corpus / train0["path"], "data.num_workers": 0,
                 "optim.steps": 10, "log.every": 5, "val.every": 5, "val.max_users": 60,
                 "val.num_candidates": 100, "ckpt.every": 0}
    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config",
           str(REPO / "launch" / "configs" / "pretrain" / "tiny.yaml"), *[f"{k}={v}" for k, v in overrides.items()]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "val"]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in val] == [5, 10]
    for r in val:  # the dev set was read once: a missing file (one "tar" event) and the lost samples
        assert r["val_users"] == 60
        assert r["val_skipped_samples_tar"] == 1 and r["val_skipped_samples_truncated"] == dev_missing
        assert r["val_skipped_samples"] == 1 + dev_missing
    # 10 steps x 16 sequences = 160 samples: the 50-sample shard was drawn at least 3 times
    assert train[-1]["samples_seen"] == 160
    assert train[-1]["skipped_samples_truncated"] == 7 and train[-1]["skipped_samples"] == 7
    assert log.count(f"only {train0['count'] - 7} of the manifest's {train0['count']} samples") == 1
    assert "No such file" in log and "Traceback" not in log
