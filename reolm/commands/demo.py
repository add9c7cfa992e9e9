"""reolm demo: the whole pipeline on an embedded synthetic corpus (what `make demo` runs)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DESCRIPTION = ("Run the whole Reo-LM pipeline on an embedded synthetic corpus: synthesise -> shard -> tokenizer "
               "and item tables -> DeepSpeed pre-training -> export -> fine-tune on the held-out domain, with and "
               "without pre-training and zero-shot, against SASRec, SASRec with item rows from the fine-tuned "
               "Reo-LM's item vectors, and popularity; the same on a cold-item split of "
               "that domain (20% of its items never trained on) -> results table. Finished stages are skipped, so "
               "the same command resumes. (`make demo` and `python launch/demo.py` run it.)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="where everything is written (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=None,
                        help="pre-training ranks (default: all GPUs, or 2 CPU ranks without a GPU)")
    parser.add_argument("--vocab-size", type=int, default=8192,
                        help="embedded tokenizer's vocabulary (default 8192: every synthetic word stays whole)")
    parser.add_argument("--fresh", action="store_true", help="delete the run directory and start over")


def run(args: argparse.Namespace) -> int:
    from reolm.demo import demo_stages, run_demo
    run_dir = Path(args.run_dir).resolve()
    start = time.perf_counter()
    timings = run_demo(run_dir, demo_stages(run_dir, args.seed, args.nproc, args.vocab_size), fresh=args.fresh)
    print("\nstage timings (s): " + ", ".join(f"{k} {v['wall_s'] if isinstance(v, dict) else v:.0f}"
                                            for k, v in timings.items()))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; results in {run_dir}\n")
    print((run_dir / "results.md").read_text())
    return 0
