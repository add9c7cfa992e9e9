"""CPU before/after: the same Reo-LM workloads on two checkouts of this repository, alternating.

Each round runs one child process per checkout (``PYTHONPATH`` = that checkout, so each imports its
own ``reolm``) that encodes the catalogue and takes stage-1 fine-tuning steps with its *default*
settings, and prints its timings; the minimum over rounds is kept.  Only APIs that every version
since the typed batches has are used (``ReoLMRecommender``, ``PrefixCollate``, ``train_step``).

    git worktree add /tmp/before <old-commit>
    python bench/cpu_before_after.py --before /tmp/before --after . --backbone HF_DIR --domain DIR

Writes ``bench/results/cpu_before_after.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import machine, write_result

CHILD = r"""
import json, sys, time
import numpy as np, torch
try:
    from reolm.runtime import setup_process   # what the entry points of newer versions call first
    setup_process()
except ImportError:
    pass
from reolm.data.domain import read_domain
from reolm.data.tables import load_tokenizer
from reolm.finetune.reolm_recommender import ReoLMRecommender
from reolm.finetune.reolm_trainer import PrefixCollate, PrefixDataset, TrainCost, train_step
from reolm.model import ModelConfig, ReoLM
backbone, domain_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
domain = read_domain(domain_dir)
torch.manual_seed(0)
model = ReoLM.from_backbone(backbone, ModelConfig(top_routing="gate", max_tokens=512))
rec = ReoLMRecommender(model, load_tokenizer(backbone), progress=False).bind(domain)
start = time.perf_counter(); rec.encode_all_items(); catalogue = time.perf_counter() - start
dataset = PrefixDataset([s for _, s in sorted(domain.train.items()) if len(s) >= 2], 10)
collate = PrefixCollate(rec.collator(0.15, seed=0), rec.num_items, 1000, micro_batch=16)
rng = np.random.default_rng(0)
rec.train()
times = []
for _ in range(steps + 1):
    batch = collate([dataset[int(i)] for i in rng.integers(0, len(dataset), 16)])
    start = time.perf_counter()
    rec.zero_grad(set_to_none=True)
    train_step(rec, batch, 0.1, TrainCost())
    times.append(time.perf_counter() - start)
print(json.dumps({"catalogue_s": catalogue, "catalogue_tokens": rec.last_encoding["tokens"],
                  "stage1_step_s": min(times[1:]), "precision": getattr(rec, "precision", "fp32")}))
"""


def run_child(tree: str, args: argparse.Namespace) -> dict:
    tree = str(Path(tree).resolve())
    env = {**os.environ, "PYTHONPATH": tree}
    # cwd = the checkout too: `python -c` puts the working directory first on sys.path
    out = subprocess.run([sys.executable, "-c", CHILD, args.backbone, args.domain, str(args.steps)],
                         env=env, cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _commit(tree: str) -> str:
    """The checkout's commit (and ``+changes`` when its work tree differs from it)."""
    head = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return (head.stdout.strip() or tree) + ("+changes" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="checkout of the earlier version")
    parser.add_argument("--after", default=".", help="checkout of the later version (default: this one)")
    parser.add_argument("--backbone", required=True, help="HF BERT/RoBERTa checkpoint directory")
    parser.add_argument("--domain", required=True, help="processed domain folder")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (minimum kept)")
    parser.add_argument("--steps", type=int, default=2, help="timed stage-1 steps per child (after one warm-up)")
    parser.add_argument("--out", default="cpu_before_after.json")
    args = parser.parse_args(argv)
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, tree in (("before", args.before), ("after", args.after)):  # backbone/domain: absolute paths
            result = run_child(tree, args)
            print(name, result, flush=True)
            if name not in best:
                best[name] = result
            else:
                for key in ("catalogue_s", "stage1_step_s"):
                    best[name][key] = min(best[name][key], result[key])
    ratios = {key: round(best["before"][key] / best["after"][key], 2) for key in ("catalogue_s", "stage1_step_s")}
    record = {"machine": machine(), "before": _commit(args.before), "after": _commit(args.after), "backbone": args.backbone,
              "domain": args.domain, "rounds": args.rounds, "best": best, "speedup_after_over_before": ratios}
    print(f"speed-up: {ratios}\nwrote {write_result(args.out, record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
