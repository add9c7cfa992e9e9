"""launch/slurm/pretrain.sbatch submitted to a real local Slurm cluster (2 nodes on loopback, see
slurm_cluster.py), tiny config, 2 nodes x 1 CPU rank, one DataLoader worker per rank.

* torchrun mode runs to the end and its loss trajectory matches the `deepspeed` launcher's
  (2 ranks, same config) step for step;
* tasks mode, the time-limit warning (USR1 to the script, what its timer and `--signal=B:USR1`
  deliver): checkpoint, requeue, resume, finish; the first steps match the deepspeed run, the
  step count is continuous and the restart count recorded;
* preemption by `scancel --signal=TERM` and by `scontrol requeue`: the same, twice;
* a time limit shorter than the stop margin trains (the margin is lowered) instead of looping;
* a run directory holding another job's checkpoints is refused, naming both jobs, unless the
  user passes --resume latest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = REPO / "launch" / "slurm" / "pretrain.sbatch"
TINY = REPO / "launch" / "configs" / "pretrain" / "tiny.yaml"
COMMON = {"log.every": 1, "val.every": 0, "ckpt.every": 0, "data.num_workers": 1}
START_TIMEOUT = 400  # seconds for a job to start training on a busy 2-core machine
LONG = 40  # steps of the jobs that are stopped after step 3 (long enough to be signalled mid-run)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from reolm.random_init import prepare_synthetic_inputs
    return prepare_synthetic_inputs(tmp_path_factory.mktemp("slurm_inputs"), "tiny", vocab_size=300,
                                    backbone_size="tiny")


def _overrides(inputs, **extra) -> list[str]:
    values = {"data.corpus": inputs["corpus"], "model.backbone": inputs["backbone"], **COMMON, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def _env(run_dir: Path, mode: str) -> dict[str, str]:
    return {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "GPUS_PER_NODE": "1", "RUN_DIR": str(run_dir), "REOLM_SLURM_MODE": mode}


def _submit(cluster, run_dir: Path, mode: str, args: list[str], *sbatch: str, env: dict[str, str] | None = None) -> int:
    out = run_dir.parent / f"{run_dir.name}-slurm-%j.out"
    return cluster.submit("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}", *sbatch,
                          str(SCRIPT), "--config", str(TINY), *args, env={**_env(run_dir, mode), **(env or {})},
                          cwd=REPO)


def _log(run_dir: Path, job: int) -> str:
    path = run_dir.parent / f"{run_dir.name}-slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _train_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines()) if r["kind"] == "train"]


def _wait_for_step(cluster, run_dir: Path, job: int, step: int) -> None:
    deadline = time.time() + START_TIMEOUT
    polls = 0
    while time.time() < deadline:
        rows = _train_rows(run_dir)
        if rows and rows[-1]["step"] >= step:
            return
        polls += 1
        if polls % 20 == 0:  # scontrol is slow on a busy machine: ask now and then only
            state = cluster.job(job).get("JobState")
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} {state}:\n{_log(run_dir, job)[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not reach step {step}:\n{_log(run_dir, job)[-3000:]}")


def _assert_continuous(rows: list[dict], steps: int) -> None:
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), [r["step"] for r in rows]
    per_step = rows[0]["samples_seen"]
    assert [r["samples_seen"] for r in rows] == [per_step * s for s in range(1, steps + 1)]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The same config under the `deepspeed` launcher (2 ranks on this machine)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(REPO / "launch" / "pretrain.py"),
           "--config", str(TINY), *_overrides(inputs, **{"optim.steps": 12}), f"run_dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _train_rows(run_dir)


def _assert_matches(rows: list[dict], reference: list[dict], upto: int) -> None:
    assert upto >= 3
    for got, want in zip(rows[:upto], reference[:upto]):
        assert got["step"] == want["step"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-5), (got, want)


@pytest.fixture(scope="module")
def torchrun_run(slurm_cluster, inputs, tmp_path_factory):
    """(job id, run dir) of a torchrun-mode job that ran 12 steps to the end."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    job = _submit(slurm_cluster, run_dir, "torchrun", _overrides(inputs, **{"optim.steps": 12}))
    info = slurm_cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), START_TIMEOUT + 200)
    assert info["JobState"] == "COMPLETED", _log(run_dir, job)[-4000:]
    return job, run_dir


def test_torchrun_mode_two_nodes_completes_like_the_deepspeed_launcher(torchrun_run, reference):
    job, run_dir = torchrun_run
    rows = _train_rows(run_dir)
    _assert_continuous(rows, 12)
    _assert_matches(rows, reference, 12)
    layout = json.loads((run_dir / "run_info.json").read_text())
    assert layout["world_size"] == 2 and layout["nodes"] == 2
    assert layout["slurm"] == {"job_id": str(job), "restart_count": 0, "nodelist": "reolm-n[1-2]"}
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_tasks_mode_time_limit_warning_checkpoints_requeues_and_resumes(slurm_cluster, inputs, reference, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, run_dir, "tasks", _overrides(inputs, **{"optim.steps": LONG}))
    _wait_for_step(slurm_cluster, run_dir, job, 3)
    # What the script's own timer (and `sbatch --signal=B:USR1@N`) delivers before the limit.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    info = slurm_cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED"), START_TIMEOUT + 300, release=True)
    log = _log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    stopped = int(log.split("checkpoint saved at step ")[1].split(";")[0])
    assert 3 <= stopped < LONG and "restart count 1" in log
    rows = _train_rows(run_dir)
    _assert_continuous(rows, LONG)  # resumed from the warning's checkpoint: no step lost or repeated
    _assert_matches(rows, reference, min(stopped, 12))
    assert json.loads((run_dir / "run_info.json").read_text())["slurm"]["restart_count"] == 1
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_preemption_by_scancel_term_and_scontrol_requeue_keeps_the_work(slurm_cluster, inputs, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, run_dir, "torchrun", _overrides(inputs, **{"optim.steps": LONG}))
    _wait_for_step(slurm_cluster, run_dir, job, 3)
    slurm_cluster.run("scancel", "--signal=TERM", str(job))  # preemption: the tasks get SIGTERM
    slurm_cluster.wait(job, ("PENDING",), 300)
    first_stop = _train_rows(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / f"step-{first_stop:08d}").is_dir()
    slurm_cluster.wait(job, ("RUNNING",), 300, release=True)
    _wait_for_step(slurm_cluster, run_dir, job, first_stop + 2)
    slurm_cluster.run("scontrol", "requeue", str(job))  # Slurm requeues it: SIGTERM, KillWait, SIGKILL
    info = slurm_cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED"), START_TIMEOUT + 300, release=True)
    log = _log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log[-4000:]
    assert "resumed from" in log and "restart count 2" in log
    _assert_continuous(_train_rows(run_dir), LONG)


def test_time_limit_shorter_than_the_stop_margin_trains(slurm_cluster, inputs, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, run_dir, "tasks", _overrides(inputs, **{"optim.steps": 6}), "--time=1")
    info = slurm_cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), START_TIMEOUT + 300,
                              release=True)
    log = _log(run_dir, job)
    lowered = re.search(r"\((\d+) s left\) is short for the 600 s stop margin .*: stopping (\d+) s before", log)
    assert lowered and 50 <= int(lowered[1]) <= 60 and int(lowered[2]) == int(lowered[1]) // 4, log[-3000:]
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "not requeueing" not in log
    _assert_continuous(_train_rows(run_dir), 6)


def test_run_dir_of_another_job_is_refused_unless_resume_is_asked(slurm_cluster, inputs, torchrun_run):
    first, run_dir = torchrun_run
    job = _submit(slurm_cluster, run_dir, "tasks", _overrides(inputs, **{"optim.steps": 12}))
    info = slurm_cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED"), START_TIMEOUT)
    log = _log(run_dir, job)
    assert info["JobState"] == "FAILED", log[-3000:]
    assert f"of run 'slurm:reolmtest:{first}'" in log and f"fresh start of run 'slurm:reolmtest:{job}'" in log
    assert "--resume latest" in log
    assert len(_train_rows(run_dir)) == 12  # nothing was written

    job = _submit(slurm_cluster, run_dir, "tasks", _overrides(inputs, **{"optim.steps": 14}) + ["--resume", "latest"])
    info = slurm_cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED"), START_TIMEOUT + 200)
    assert info["JobState"] == "COMPLETED", _log(run_dir, job)[-3000:]
    _assert_continuous(_train_rows(run_dir), 14)
    assert json.loads((run_dir / "owner.json").read_text())["run_id"] == f"slurm:reolmtest:{job}"
