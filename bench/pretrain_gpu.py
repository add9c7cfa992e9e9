#!/usr/bin/env python
"""One-GPU pre-training: bf16, ZeRO-2, the paper's model shape, from a synthetic corpus.

Builds the `demo` synthetic corpus (items of three attributes, log-normal history lengths up to
50 items; no images, so every item uses the void image) -> shards -> WordPiece tokenizer ->
token table -> a random-weight MiniLM-L12-H384-shaped backbone, then runs
`python launch/pretrain.py --config launch/configs/pretrain/paper.yaml` (1,024 tokens, 50 items,
8 adapters of rank 128, bf16, ZeRO-2) on one process for --steps steps with the paper's micro
batch (32) and no accumulation, and records real tokens/s, TFLOP/s, MFU, peak memory and the
loss from the run's metrics.jsonl in bench/results/pretrain_gpu.json (or --out). The run's output
goes straight to this script's; the JSON is rewritten every 10 s from the run's metrics.jsonl,
and stopped by SIGTERM (a time limit), the script stops the run (no checkpoint) and writes what
it logged ("complete": false).

    python bench/pretrain_gpu.py [--steps 200] [--workdir DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from pretrain_cpu import steady_state  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--micro-batch", type=int, default=32, help="sequences per step (the paper's micro batch)")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--workdir", default=None, help="keep inputs and the run here (default: a temp folder)")
    parser.add_argument("--out", default="pretrain_gpu.json",
                        help="result JSON: a file name under bench/results/, or a path")
    args = parser.parse_args()

    import torch

    from common import PartialResult, machine
    from reolm.random_init import prepare_synthetic_inputs

    if not torch.cuda.is_available():
        print("pretrain_gpu.py: no CUDA device", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="reolm_pretrain_gpu_"))
    t0 = time.perf_counter()
    inputs = prepare_synthetic_inputs(work / "inputs", "demo", vocab_size=8192, backbone_size="minilm-l12-h384",
                                      shard_size=1000)
    prep_s = time.perf_counter() - t0
    run_dir = work / "run"
    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"),
           "--config", str(REPO / "launch" / "configs" / "pretrain" / "paper.yaml"),
           f"data.corpus={inputs['corpus']}", f"model.backbone={inputs['backbone']}", f"run_dir={run_dir}",
           f"optim.steps={args.steps}", f"optim.micro_batch_size={args.micro_batch}",
           f"optim.global_batch_size={args.micro_batch}", "optim.warmup_steps=20", "optim.lr=2e-4",
           f"log.every={args.log_every}", "log.tensorboard=false", "log.progress=false", "val.every=0",
           "ckpt.every=0", "ckpt.save_on_signal=false", "model.image_feature_dim=512",
           "dist.ds_config=ds_configs/zero2.json"]
    result = PartialResult(args.out, benchmark="pretrain_gpu",
                           config="launch/configs/pretrain/paper.yaml on 1 GPU: random MiniLM-L12-H384-shaped BERT "
                                  "(vocab 8192 WordPiece trained on the corpus), synthetic `demo` corpus, bf16, ZeRO-2",
                           steps=args.steps, micro_batch=args.micro_batch, prepare_inputs_s=round(prep_s, 1),
                           machine=machine("cuda"))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))  # stop the run, then report
    while (returncode := poll(proc, 10.0)) is None:  # the figures so far, in case even this script is killed
        result.update(launch_to_exit_s=None, **progress(run_dir))
    result.update(returncode=returncode, launch_to_exit_s=round(time.perf_counter() - t0, 1), **progress(run_dir))
    if returncode != 0:
        print(f"pretrain_gpu.py: launch/pretrain.py exited with {returncode}; partial results in {result.update()}")
        return 1
    print(f"wrote {result.finish()}")
    print({k: result.doc[k] for k in ("steps_per_s", "tokens_per_s", "first_loss", "final_loss") if k in result.doc})
    return 0


def poll(proc: subprocess.Popen, seconds: float) -> int | None:
    """The run's exit status, or None if it is still running after ``seconds``."""
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def progress(run_dir: Path) -> dict:
    """:func:`steady_state` of the run so far or, while it has logged too little for that (or is
    half-way through writing a line), how many train windows it has logged."""
    try:
        return steady_state(run_dir)
    except (OSError, ValueError, KeyError, IndexError, ZeroDivisionError):
        pass
    metrics = run_dir / "metrics.jsonl"
    rows = metrics.read_text().splitlines() if metrics.is_file() else []
    return {"train_windows": sum('"kind": "train"' in r for r in rows)}

if __name__ == "__main__":
    raise SystemExit(main())
