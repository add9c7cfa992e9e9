"""Helpers of the multi-process pre-training tests: start `deepspeed` / `python` runs on the tiny
synthetic corpus the way users start them, and read what they wrote."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = REPO / "launch" / "configs" / "pretrain" / "tiny.yaml"
PRETRAIN = REPO / "launch" / "pretrain.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def deepspeed_cmd(ranks: int, overrides: list[str]) -> list[str]:
    """`deepspeed --num_gpus N launch/pretrain.py --config tiny.yaml ...` (N gloo ranks on a CPU)."""
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
            str(PRETRAIN), "--config", str(TINY), *overrides]


# A loaded machine (several suites side by side) may need more: REOLM_TEST_LAUNCH_TIMEOUT=seconds.
LAUNCH_TIMEOUT = float(os.environ.get("REOLM_TEST_LAUNCH_TIMEOUT", "400"))


def run_logged(cmd: list[str], log: Path, timeout: float = LAUNCH_TIMEOUT, expect: int = 0) -> subprocess.CompletedProcess:
    """Run ``cmd`` appending its output to ``log``; assert its exit status is ``expect``."""
    with open(log, "ab") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=run_env(), timeout=timeout, cwd=REPO)
    assert proc.returncode == expect, f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-4000:]}"
    assert_no_shm_left(cmd)
    return proc


def assert_no_shm_left(cmd: list[str]) -> None:
    """DeepSpeed's CPU allreduce files of the run on ``--master_port`` are gone (they used to leak,
    66 MiB per rank, until /dev/shm filled the machine's memory)."""
    if "--master_port" not in cmd:
        return
    port = cmd[cmd.index("--master_port") + 1]
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not left, f"DeepSpeed shared-memory files left behind: {[p.name for p in left]}"


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == kind]


def base_overrides(inputs, run_dir: Path, **extra) -> list[str]:
    values = {"data.corpus": inputs["corpus"], "model.backbone": inputs["backbone"], "run_dir": run_dir}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def consumed(path: Path, start: int = 0) -> list[tuple[int, str]]:
    """(step, sample key) lines of a `data.record_keys` log from byte ``start`` on."""
    with open(path) as f:
        f.seek(start)
        return [(int(step), key) for step, key in (line.rstrip("\n").split("\t") for line in f if line.strip())]


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launcher still running and every process below it (found before the launcher dies:
    its orphans would be re-parented out of reach)."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    proc.kill()
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.wait()


def wait_for_steps(run_dir: Path, steps: int, proc: subprocess.Popen, log: Path,
                    timeout: float = LAUNCH_TIMEOUT) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {steps} steps in {timeout} s:\n{log.read_text()[-3000:]}")


def finetune_main(args: list[str]) -> int:
    """``reolm finetune`` (= ``launch/finetune.py``) in this process (exit code)."""
    from reolm.cli import main
    return main(["finetune", *args])


def evaluate_main(args: list[str]) -> int:
    """``reolm evaluate`` (= ``launch/evaluate.py``) in this process (exit code)."""
    from reolm.cli import main
    return main(["evaluate", *args])
