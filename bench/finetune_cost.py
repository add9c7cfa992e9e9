#!/usr/bin/env python
"""Stage-1 fine-tuning cost: the reference negatives against negatives shared by an optimiser step.

Both settings fine-tune the demo's pre-trained export (``make demo`` / ``reolm.demo``) on its
held-out domain with ``launch/configs/finetune/demo.yaml``, stage 1 only, on the same number
of training examples per epoch:

* **reference** — ``negative_pool=batch``: every 16 histories get 1,000 fresh negatives
  (capped at the catalogue) plus their targets, encoded with gradient;
* **shared** — ``negative_pool=step``: 16 micro-batches of 16 histories per optimiser step
  share one pool (1,000 negatives, capped, plus every target of the step), encoded once.

For each seed it records FLOPs per training example (``ReoLM.training_flops`` summed over
every forward + backward of stage 1, from the run log's ``train_cost`` record) and the best
validation NDCG@10 of stage 1.  Writes bench/results/finetune_cost.json.

    PYTHONPATH=. python bench/finetune_cost.py --demo-dir /work/runs/demo --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_result  # noqa: E402
from reolm.config import load_config  # noqa: E402
from reolm.finetune.config import FinetuneConfig  # noqa: E402
from reolm.finetune.runner import run_finetune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "launch" / "configs" / "finetune" / "demo.yaml"


def settings(args: argparse.Namespace) -> dict[str, list[str]]:
    common = ["reolm.negatives=1000", "reolm.stage1.batch_size=16", f"reolm.stage1.epochs={args.epochs}",
              "reolm.stage1.evals_per_epoch=1", f"reolm.stage1.patience={args.epochs}", "reolm.stage2.epochs=0",
              "reolm.initial_validation=false", "train.progress=false", "train.device=cpu"]
    k = args.accumulation
    return {
        "reference": common + ["reolm.negative_pool=batch", "reolm.stage1.accumulation=1",
                               f"reolm.stage1.max_steps_per_epoch={args.steps}", f"reolm.stage1.lr={args.lr}",
                               f"reolm.stage1.warmup_steps={args.warmup}"],
        "shared": common + ["reolm.negative_pool=step", f"reolm.stage1.accumulation={k}",
                            f"reolm.stage1.max_steps_per_epoch={max(1, args.steps // k)}",
                            f"reolm.stage1.lr={args.shared_lr}", f"reolm.stage1.warmup_steps={max(1, args.warmup // k)}"],
    }


def run_one(name: str, overrides: list[str], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(FinetuneConfig, [DEMO_CONFIG], overrides + [f"train.seed={seed}", "model=reolm"])
    run_dir = Path(args.work) / f"{name}-seed{seed}"
    start = time.perf_counter()
    metrics = run_finetune(cfg, args.demo_dir / "data" / "Scientific", run_dir, init=args.demo_dir / "pretrained")
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    (cost,) = [r for r in records if r.get("stage") == "reolm-stage1" and r.get("event") == "train_cost"]
    vals = [r["val"]["NDCG@10"] for r in records if r.get("stage") == "reolm-stage1" and "val" in r]
    result = {"seed": seed, "flops_per_example": cost["flops_per_example"], "train_flops": cost["train_flops"],
              "train_examples": cost["train_examples"], "best_val_ndcg10": metrics["stage1"]["best_val"]["NDCG@10"],
              "val_ndcg10_per_epoch": vals, "seconds": round(seconds, 1)}
    print(f"{name} seed {seed}: {result}", flush=True)
    return result


def summarise(runs: list[dict[str, Any]], overrides: list[str]) -> dict[str, Any]:
    return {"flops_per_example": statistics.mean(r["flops_per_example"] for r in runs),
            "best_val_ndcg10": statistics.mean(r["best_val_ndcg10"] for r in runs),
            "runs": runs, "overrides": overrides}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", type=Path, required=True,
                        help="a finished demo run dir (data/Scientific and pretrained/ inside)")
    parser.add_argument("--work", default="/tmp/finetune_cost", help="where the fine-tuning runs are written")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32, help="reference optimiser steps per epoch (16 histories)")
    parser.add_argument("--accumulation", type=int, default=16, help="shared: micro-batches of 16 per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="reference peak lr (the demo's)")
    parser.add_argument("--shared-lr", type=float, default=4e-3, help="shared peak lr (larger batch)")
    parser.add_argument("--warmup", type=int, default=20, help="reference warm-up steps (shared: / accumulation)")
    parser.add_argument("--out", default="finetune_cost.json", help="file name under bench/results/")
    parser.add_argument("--only", nargs="+", choices=("reference", "shared"), default=["reference", "shared"],
                        help="run only these settings (a partial file for --combine)")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="merge result files of runs on other seeds (run in parallel) into --out")
    args = parser.parse_args()
    if args.combine:
        return combine(args.combine, args.out)
    doc: dict[str, Any] = {"benchmark": "bench/finetune_cost.py", "domain": "demo held-out domain (Scientific)",
                           "init": "demo pre-trained export", "seeds": args.seeds,
                           "protocol": f"stage 1 only, {args.epochs} epochs of {args.steps * 16} examples, best "
                                       f"validation NDCG@10 (full ranking of all items); FLOPs = "
                                       f"ReoLM.training_flops over every stage-1 forward+backward"}
    for name, overrides in settings(args).items():
        if name in args.only:
            doc[name] = summarise([run_one(name, overrides, seed, args) for seed in args.seeds], overrides)
    if len(args.only) < 2:  # a part, for --combine
        print(f"wrote {write_result(args.out, doc)}")
        return 0
    return finish(doc, args.out)


def finish(doc: dict[str, Any], out: str) -> int:
    doc["flops_ratio"] = doc["reference"]["flops_per_example"] / doc["shared"]["flops_per_example"]
    doc["ndcg_ratio"] = doc["shared"]["best_val_ndcg10"] / doc["reference"]["best_val_ndcg10"]
    doc["machine"] = machine()
    print(json.dumps({k: doc[k] for k in ("flops_ratio", "ndcg_ratio")}))
    print(f"wrote {write_result(out, doc)}")
    return 0


def combine(paths: list[Path], out: str) -> int:
    """One document from per-seed documents of the same protocol."""
    docs = [json.loads(p.read_text()) for p in paths]
    doc = {k: v for k, v in docs[0].items() if k not in ("reference", "shared", "flops_ratio", "ndcg_ratio")}
    doc["seeds"] = [s for d in docs for s in d["seeds"]]
    doc["seeds"] = sorted(set(doc["seeds"]))
    for name in ("reference", "shared"):
        parts = [d[name] for d in docs if name in d]
        doc[name] = summarise([r for part in parts for r in part["runs"]], parts[0]["overrides"])
    return finish(doc, out)


if __name__ == "__main__":
    raise SystemExit(main())
