#!/usr/bin/env python
"""CPU pre-training throughput: the demo config on 2 ranks through the `deepspeed` launcher.

Builds the demo inputs in a temporary folder (synthetic corpus -> shards -> tokenizer -> token
table -> random backbone), runs `deepspeed --num_gpus 2 launch/pretrain.py --config
launch/configs/pretrain/demo.yaml` for --steps steps, and reports steps/s, samples/s, real
tokens/s and the data-wait share from the run's metrics.jsonl (the first logging window, which
includes start-up, is left out).  Writes bench/results/pretrain_cpu.json with the machine.

    python bench/pretrain_cpu.py [--steps 60] [--ranks 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def machine() -> dict:
    import torch
    import deepspeed
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "cuda": torch.cuda.is_available(),
            "load_average_at_start": list(os.getloadavg())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steady_state(run_dir: Path) -> dict:
    """Means over a run's metrics.jsonl train windows, the first (with start-up) left out."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if r["kind"] == "train"]
    train = windows[1:]
    mean = lambda key: sum(r[key] for r in train) / len(train)  # noqa: E731
    out = {"global_batch": json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"],
           "steps_per_s": (train[-1]["step"] - windows[0]["step"]) / (train[-1]["time"] - windows[0]["time"]),
           "samples_per_s": mean("samples_per_s"), "tokens_per_s": mean("tokens_per_s"),
           "data_wait_share": mean("data_wait_share"), "first_loss": windows[0]["loss"],
           "final_loss": train[-1]["loss"]}
    for key in ("tflops_per_device", "mfu"):
        if all(key in r for r in train):
            out[key] = mean(key)
    if "peak_memory_gib" in train[-1]:
        out["peak_memory_gib"] = max(r["peak_memory_gib"] for r in windows)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--workdir", default=None, help="keep inputs and the run here (default: a temp folder)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "pretrain_cpu.json"))
    args = parser.parse_args()

    from reolm.random_init import prepare_synthetic_inputs

    work = Path(args.workdir or tempfile.mkdtemp(prefix="reolm_bench_"))
    info = machine()
    t0 = time.perf_counter()
    inputs = prepare_synthetic_inputs(work / "inputs", "demo", vocab_size=2000, backbone_size="tiny",
                                      shard_size=500)
    prep_s = time.perf_counter() - t0
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh start refuses a folder with checkpoints
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.ranks), "--master_port",
           str(free_port()), str(REPO / "launch" / "pretrain.py"),
           "--config", str(REPO / "launch" / "configs" / "pretrain" / "demo.yaml"),
           f"data.corpus={inputs['corpus']}", f"model.backbone={inputs['backbone']}", f"run_dir={run_dir}",
           f"optim.steps={args.steps}", f"log.every={args.log_every}", "val.every=0", "ckpt.every=0",
           "log.progress=false"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        return 1
    result = {
        "benchmark": "pretrain_cpu",
        "config": "launch/configs/pretrain/demo.yaml (random `reolm init backbone --size tiny`: 2 layers, H64, 2 heads; vocab 2000)",
        "ranks": args.ranks,
        "steps": args.steps,
        **steady_state(run_dir),
        "launch_to_exit_s": wall,
        "prepare_inputs_s": prep_s,
        "machine": info,
        "note": "steady-state windows only (the first logging window includes start-up); the CPU is shared, "
                "see load_average_at_start",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| ranks | global batch | steps/s | samples/s | real tokens/s | data-wait share |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.ranks} | {result['global_batch']} | {result['steps_per_s']:.2f} | {result['samples_per_s']:.1f} | "
          f"{result['tokens_per_s']:.0f} | {result['data_wait_share']:.3f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
