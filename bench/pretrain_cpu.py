#!/usr/bin/env python
"""CPU pre-training throughput: a pre-training config on 2 ranks through the `deepspeed` launcher.

By default it builds the demo inputs in a temporary folder (synthetic corpus -> shards ->
tokenizer -> token table -> random backbone), runs `deepspeed --num_gpus 2 launch/pretrain.py
--config launch/configs/pretrain/demo.yaml` for --steps steps, and reports steps/s, samples/s, real
tokens/s and the data-wait share from the run's metrics.jsonl (the first logging window, which
includes start-up, is left out).  Writes bench/results/pretrain_cpu.json with the machine.

    python bench/pretrain_cpu.py [--steps 60] [--ranks 2] [--workdir DIR]

With ``--precisions fp32 bf16`` it runs each precision (``optim.precision``) ``--rounds`` times,
interleaved, and reports each one's best round and the ratio to the first; with ``--corpus`` and
``--backbone`` (and e.g. ``--config launch/configs/pretrain/real-cpu.yaml``) it trains on a real
corpus and checkpoint instead of the synthetic ones:

    python bench/pretrain_cpu.py --config launch/configs/pretrain/real-cpu.yaml --corpus RUN/shards \\
        --backbone /models/all-MiniLM-L6-v2 --precisions fp32 bf16 --rounds 2 --steps 20 --log-every 5 \\
        --out pretrain_cpu_precision.json
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


def run_pretraining(args: argparse.Namespace, corpus: str, backbone: str, run_dir: Path,
                    precision: str | None) -> tuple[dict, float]:
    """One launched run; (its steady state, launch-to-exit seconds). Raises with the run's output tail."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh start refuses a folder with checkpoints
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.ranks), "--master_port",
           str(free_port()), str(REPO / "launch" / "pretrain.py"), "--config", str(args.config),
           f"data.corpus={corpus}", f"model.backbone={backbone}", f"run_dir={run_dir}",
           f"optim.steps={args.steps}", f"log.every={args.log_every}", "val.every=0", "ckpt.every=0",
           "log.progress=false", *([f"optim.precision={precision}"] if precision else [])]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pre-training ({precision or 'config precision'}) failed:\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    steady = steady_state(run_dir)
    steady["precision"] = json.loads((run_dir / "run_info.json").read_text())["precision"]
    return steady, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--config", type=Path, default=REPO / "launch" / "configs" / "pretrain" / "demo.yaml",
                        help="pre-training config (default: the demo's)")
    parser.add_argument("--corpus", default=None, help="a real corpus folder (default: a synthetic one is built)")
    parser.add_argument("--backbone", default=None, help="a real HF checkpoint (with --corpus)")
    parser.add_argument("--precisions", nargs="+", choices=("auto", "fp32", "bf16"), default=None,
                        help="run each optim.precision (default: the config's, once)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved runs of each precision (best kept)")
    parser.add_argument("--workdir", default=None, help="keep inputs and the run here (default: a temp folder)")
    parser.add_argument("--out", default="pretrain_cpu.json", help="results file (a bare name goes under bench/results/)")
    args = parser.parse_args()
    if bool(args.corpus) != bool(args.backbone):
        parser.error("--corpus and --backbone go together")
    out = Path(args.out) if Path(args.out).parent != Path(".") else REPO / "bench" / "results" / args.out

    work = Path(args.workdir or tempfile.mkdtemp(prefix="reolm_bench_"))
    info = machine()
    t0 = time.perf_counter()
    if args.corpus:
        corpus, backbone, what = args.corpus, args.backbone, f"corpus {args.corpus}, backbone {args.backbone}"
    else:
        from reolm.random_init import prepare_synthetic_inputs
        inputs = prepare_synthetic_inputs(work / "inputs", "demo", vocab_size=2000, backbone_size="tiny",
                                          shard_size=500)
        corpus, backbone = inputs["corpus"], inputs["backbone"]
        what = "random `reolm init backbone --size tiny`: 2 layers, H64, 2 heads; vocab 2000"
    prep_s = time.perf_counter() - t0
    precisions = args.precisions or [None]
    runs = []
    for round_ in range(args.rounds):
        for precision in precisions:
            steady, wall = run_pretraining(args, corpus, backbone, work / f"run-{precision}-{round_}", precision)
            runs.append({"round": round_, "requested": precision or "config", **steady, "launch_to_exit_s": wall})
    best = {p or "config": max((r for r in runs if r["requested"] == (p or "config")), key=lambda r: r["tokens_per_s"])
            for p in precisions}
    result = {
        "benchmark": "pretrain_cpu",
        "config": f"{os.path.relpath(args.config, REPO)} ({what})",
        "ranks": args.ranks,
        "steps": args.steps,
        **next(iter(best.values())),
        "prepare_inputs_s": prep_s,
        "machine": info,
        "note": "steady-state windows only (the first logging window includes start-up); the CPU is shared, "
                "see load_average_at_start",
    }
    if len(precisions) > 1:
        first = next(iter(best))
        result.update(runs=runs, best=best, ratio_tokens_per_s={
            f"{p}_vs_{first}": round(b["tokens_per_s"] / best[first]["tokens_per_s"], 3) for p, b in best.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| precision | ranks | global batch | steps/s | samples/s | real tokens/s | data-wait share |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in best.values():
        print(f"| {row['precision']} | {args.ranks} | {row['global_batch']} | {row['steps_per_s']:.2f} | "
              f"{row['samples_per_s']:.1f} | {row['tokens_per_s']:.0f} | {row['data_wait_share']:.3f} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
