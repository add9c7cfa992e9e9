"""bench/gpu_acceptance.sh is ready for a bare GPU box: its dry run lists every step within the
8-minute budget and runs nothing (CPU check; the real run needs the lent GPU machine)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_acceptance_dry_run_lists_every_step_within_budget():
    results = REPO / "bench" / "results"
    before = sorted(p.name for p in results.iterdir())
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_acceptance.sh"), "--dry-run"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    steps = [line.split() for line in out.splitlines() if line.startswith("  ")]
    names = [s[0] for s in steps]
    assert names == ["install", "environment", "cuda-tests", "throughput", "pretrain-200-steps",
                     "finetune-and-ranking", "ranking-1M-items"]
    assert sum(int(s[1].rstrip("s")) for s in steps) <= 480
    commands = {s[0]: " ".join(s[2:]) for s in steps}
    assert "--no-index --find-links .whl deepspeed webdataset" in commands["install"]
    assert "-m gpu" in commands["cuda-tests"] and "tests/test_model_backends.py" in commands["cuda-tests"]
    for script in ("bench/throughput.py", "bench/pretrain_gpu.py", "bench/finetune_gpu.py", "bench/ranking.py"):
        assert any(script in c for c in commands.values()), script
        assert (REPO / script).is_file(), script
    assert sorted(p.name for p in results.iterdir()) == before  # a dry run writes nothing
