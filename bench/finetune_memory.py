#!/usr/bin/env python
"""Peak memory of a Reo-LM fine-tuning stage-1 step on CPU, with and without gradient checkpointing.

    python bench/finetune_memory.py --backbone /models/all-MiniLM-L6-v2 --domain data/Tools \
        [--batch-size 16] [--negatives 100 200] [--checkpointing off on] [--steps 2]

A stage-1 step encodes the batch's histories and the candidate items (targets + sampled negatives)
WITH gradient, so its activations grow with the number of negatives. Each configuration runs in a
fresh process (peak RSS = ``ru_maxrss`` of that process: model, optimizer state, one collated
batch, forward + backward + AdamW step) so the figures do not mix. Writes
``bench/results/finetune_memory_cpu.json`` with a linear fit of peak RSS against negatives per
setting, for extrapolating to the default 1,000 negatives without running it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build(backbone: str, domain_dir: str, negatives: int, device: str = "cpu", **model: object):
    """(recommender bound to the domain, its training prefixes, a stage-1 collate) as the trainer builds them."""
    from reolm.data.domain import read_domain
    from reolm.data.tables import load_tokenizer
    from reolm.finetune.reolm_recommender import ReoLMRecommender, sized_for_domain
    from reolm.finetune.reolm_trainer import PrefixCollate, PrefixDataset
    from reolm.model import ModelConfig, ReoLM

    domain = read_domain(domain_dir)
    torch.manual_seed(0)
    cfg = sized_for_domain(ModelConfig(top_routing="gate", **model), domain)
    model = ReoLM.from_backbone(backbone, cfg)
    rec = ReoLMRecommender(model, load_tokenizer(backbone), progress=False).to(device).bind(domain)
    dataset = PrefixDataset([s for _, s in sorted(domain.train.items()) if len(s) >= 2], max_history=10)
    collate = PrefixCollate(rec.collator(rec.model.config.mlm_probability, seed=0), rec.num_items, negatives)
    return rec, dataset, collate


def train_steps(rec, dataset, collate, batch_size: int, steps: int, mlm_weight: float = 0.1) -> list[float]:
    """Seconds of each of ``steps`` AdamW steps, the device synchronised: collating the batch (its
    ~1,000 candidate items in stage 1), the copy to the device and the trainer's ``train_step``
    (stage 1 with a collate that draws pools, else stage 2 against ``rec.item_table``).  Collation
    counts: with reolm.num_workers 0 the trainer does it on the same thread."""
    from reolm.finetune.reolm_trainer import TrainCost, train_step

    order = np.random.default_rng(0).permutation(len(dataset))
    optimizer = torch.optim.AdamW(rec.model.parameters(), lr=5e-5)
    rec.train()
    times = []
    for step in range(steps):
        rows = order[(step * batch_size) % len(order):][:batch_size]
        if rec.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        batch = collate([dataset[int(i)] for i in rows]).to(rec.device)
        optimizer.zero_grad(set_to_none=True)
        train_step(rec, batch, mlm_weight, TrainCost())  # forward and backward
        optimizer.step()
        if rec.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def measure(backbone: str, domain_dir: str, batch_size: int, negatives: int, checkpointing: bool,
            steps: int, max_tokens: int) -> dict[str, float]:
    """One CPU configuration in this process: peak RSS (GB) and seconds per step (the last)."""
    rec, dataset, collate = build(backbone, domain_dir, negatives, attention="sdpa", max_tokens=max_tokens,
                                  gradient_checkpointing=checkpointing)
    times = train_steps(rec, dataset, collate, batch_size, steps)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_gb": round(peak_kb / 2**20, 3), "step_s": round(times[-1], 2),
            "candidates": batch_size + negatives}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="local HF checkpoint (e.g. all-MiniLM-L6-v2)")
    parser.add_argument("--domain", required=True, help="processed domain folder (real item text)")
    parser.add_argument("--batch-size", type=int, default=16, help="histories per step (default 16)")
    parser.add_argument("--negatives", type=int, nargs="+", default=[100, 200], help="negatives per step")
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--steps", type=int, default=2, help="steps per configuration (default 2)")
    parser.add_argument("--max-tokens", type=int, default=512, help="model.max_tokens (default 512)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = measure(args.backbone, args.domain, args.batch_size, args.negatives[0],
                         args.checkpointing[0] == "on", args.steps, args.max_tokens)
        print(json.dumps(result))
        return 0
    from common import machine, write_result

    runs = []
    for ckpt in args.checkpointing:
        for negatives in args.negatives:
            cmd = [sys.executable, __file__, "--child", "--backbone", args.backbone, "--domain", args.domain,
                   "--batch-size", str(args.batch_size), "--negatives", str(negatives), "--checkpointing", ckpt,
                   "--steps", str(args.steps), "--max-tokens", str(args.max_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append({"checkpointing": ckpt, "negatives": negatives,
                         **json.loads(out.stdout.strip().splitlines()[-1])})
            print(json.dumps(runs[-1]), flush=True)
    fits = {}
    for ckpt in args.checkpointing:
        pts = [(r["negatives"], r["peak_rss_gb"]) for r in runs if r["checkpointing"] == ckpt]
        if len(pts) >= 2:
            slope, intercept = np.polyfit(*zip(*pts), 1)
            fits[ckpt] = {"gb_per_negative": round(float(slope), 5), "gb_at_0": round(float(intercept), 3),
                          "extrapolated_gb_at_1000": round(float(intercept + 1000 * slope), 2)}
    result = {"benchmark": "finetune_memory", "machine": machine("cpu"), "backbone": args.backbone,
              "domain": Path(args.domain).name, "batch_size": args.batch_size, "max_tokens": args.max_tokens,
              "steps": args.steps, "runs": runs, "linear_fit": fits}
    print(f"wrote {write_result('finetune_memory_cpu.json', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
