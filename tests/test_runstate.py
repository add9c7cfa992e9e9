"""Who owns a run directory (ckpt.run_id, ckpt.resume=auto) and the stop status the Slurm script reads."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from reolm.train.config import PretrainConfig
from reolm.train.runstate import RunDirError, claim_run_dir, mark_running, read_status, write_status


def _cfg(run_dir: Path, resume: str = "", run_id: str = "slurm:c:17", lr: float = 1e-3) -> PretrainConfig:
    cfg = PretrainConfig()
    return dataclasses.replace(cfg, run_dir=str(run_dir), ckpt=dataclasses.replace(cfg.ckpt, resume=resume, run_id=run_id),
                               optim=dataclasses.replace(cfg.optim, lr=lr))


def test_fresh_start_claims_an_empty_run_dir_and_auto_resumes_only_its_own_run(tmp_path):
    ckpts = [tmp_path / "checkpoints" / "step-00000010"]
    # No checkpoints: a fresh start and resume=auto both start fresh.
    assert claim_run_dir(_cfg(tmp_path), []).ckpt.resume == ""
    assert claim_run_dir(_cfg(tmp_path, "auto"), []).ckpt.resume == ""
    mark_running(_cfg(tmp_path), 0)
    owner = json.loads((tmp_path / "owner.json").read_text())
    assert owner["run_id"] == "slurm:c:17" and owner["config"]["optim.lr"] == 1e-3 and "run_dir" not in owner["config"]
    # The same run (a requeued job) resumes its checkpoints.
    assert claim_run_dir(_cfg(tmp_path, "auto"), ckpts).ckpt.resume == "latest"

    # Another job (a recycled id shows as a fresh start of the same id): refused, naming both.
    with pytest.raises(RunDirError, match=r"of run 'slurm:c:17' \(since .*\); this is a fresh start of run "
                                          r"'slurm:c:17'.*--resume latest"):
        claim_run_dir(_cfg(tmp_path), ckpts)
    with pytest.raises(RunDirError, match=r"of run 'slurm:c:17' .*not of this run 'slurm:c:18'"):
        claim_run_dir(_cfg(tmp_path, "auto", run_id="slurm:c:18"), ckpts)
    # Another config: refused, listing the key and both values.
    with pytest.raises(RunDirError, match=r"another config \(optim.lr: 0.001 there, 0.005 here\)"):
        claim_run_dir(_cfg(tmp_path, "auto", lr=5e-3), ckpts)
    # Unless the user asked for these checkpoints.
    assert claim_run_dir(_cfg(tmp_path, "latest", run_id="slurm:c:18", lr=5e-3), ckpts).ckpt.resume == "latest"
    mark_running(_cfg(tmp_path, "latest", run_id="slurm:c:18", lr=5e-3), 10)
    assert json.loads((tmp_path / "owner.json").read_text())["run_id"] == "slurm:c:18"


def test_checkpoints_without_an_owner_record_are_not_auto_resumed(tmp_path):
    with pytest.raises(RunDirError, match="a run that recorded no owner"):
        claim_run_dir(_cfg(tmp_path, "auto"), [tmp_path / "checkpoints" / "step-00000005"])
    (tmp_path / "owner.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match="owner.json: expected a JSON object"):
        claim_run_dir(_cfg(tmp_path, "auto"), [tmp_path / "checkpoints" / "step-00000005"])


def test_status_file_and_its_shell_reader(tmp_path):
    run = [sys.executable, "-m", "reolm.train.runstate", str(tmp_path)]
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout.split() == ["none", "0", "0"]
    write_status(tmp_path, "stopped", 37, 20, "SIGTERM")
    assert read_status(tmp_path)["reason"] == "SIGTERM"
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout.split() == ["stopped", "37", "20"]
