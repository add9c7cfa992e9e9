#!/usr/bin/env python
"""How a PLM ranks a real domain zero-shot, and which way of rendering a history helps it.

    python bench/zero_shot_analysis.py --domain DIR --backbone HF_DIR [--split val] [--max-users N]

DIR is a processed domain with the backbone's token table (``reolm import recformer`` then
``reolm tables tokens``). Each variant is an ordinary ``launch/evaluate.py`` run of the plain
checkpoint (``plm-zeroshot``: the Reo-LM encoder with the PLM's weights; the item-position rows
start at zero and every token type as the PLM's type 0, so nothing Reo-LM adds changes the PLM's
output) by full ranking on the validation split:

* pooling: the [CLS] output or the mean of all tokens;
* history length: the most recent 1, 3 or 9 items (9 = Reo-LM's default at evaluation). With one
  item the score is plain item-to-item text similarity to the last purchase.

Writes bench/results/zero_shot_<domain>.json (every variant's NDCG@10, Recall@10, MRR, AUC) and
prints the table. docs/transfer.md discusses the recorded run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

POOLINGS = ("cls", "mean")
HISTORY_ITEMS = (1, 3, 9)
METRICS = ("NDCG@10", "Recall@10", "MRR", "AUC")


def evaluate_variant(domain: Path, backbone: Path, split: str, max_users: int, pooling: str,
                     history_items: int, out: Path) -> dict:
    """One ``launch/evaluate.py`` run; returns its metrics document."""
    argv = [sys.executable, str(REPO / "launch" / "evaluate.py"), "--domain", str(domain), "--model", str(backbone),
            "--split", split, "--no-progress", "--out", str(out), "--max-users", str(max_users), "--seed", "0",
            f"reolm.model.pooling={pooling}", f"eval.max_history_items={history_items}"]
    subprocess.run(argv, check=True, cwd=REPO)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", required=True, type=Path, help="processed domain folder with a token table")
    parser.add_argument("--backbone", required=True, type=Path, help="local HF checkpoint (BERT/RoBERTa)")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--max-users", type=int, default=0, help="a seeded subset of users (0 = all)")
    args = parser.parse_args(argv)
    from common import machine, write_result

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pooling, items in itertools.product(POOLINGS, HISTORY_ITEMS):
            start = time.perf_counter()
            doc = evaluate_variant(args.domain, args.backbone, args.split, args.max_users, pooling, items,
                                   Path(tmp) / f"{pooling}-{items}.json")
            rows.append({"pooling": pooling, "history_items": items, "num_users": doc["num_users"],
                         "wall_s": round(time.perf_counter() - start, 1),
                         **{m: round(doc["metrics"][m], 5) for m in METRICS if m in doc["metrics"]}})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n| pooling | history items | {' | '.join(METRICS)} |\n|---|---:|{'---:|' * len(METRICS)}")
    for row in rows:
        print(f"| {row['pooling']} | {row['history_items']} | "
              + " | ".join(f"{row.get(m, float('nan')):.4f}" for m in METRICS) + " |")
    path = write_result(f"zero_shot_{args.domain.name}.json", {
        "benchmark": "zero_shot_analysis", "machine": machine(), "domain": str(args.domain),
        "backbone": str(args.backbone), "split": args.split, "max_users": args.max_users, "rows": rows})
    print(f"recorded {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
