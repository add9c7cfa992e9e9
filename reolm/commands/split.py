"""reolm split cold-items|few-shot DOMAIN_DIR ... --out DIR: derived evaluation settings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DESCRIPTION = """\
reolm split cold-items DOMAIN_DIR --fraction F --seed S --out DIR
    A random fraction F of the items never occurs in training: they are removed from
    every training sequence and stay only as validation/test targets (and in test
    histories, where the user's validation item is one). Users left without any training
    item are dropped. Item indices are unchanged; cold item ids go to DIR/cold_items.json.

reolm split few-shot DOMAIN_DIR --users F --seed S --out DIR
    Keep a random fraction F of the users (train, val and test), renumbered densely.

Both write a normal processed domain folder, carry over images/, image features and
token tables (same item indices), and append their provenance to domain.json "splits"."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    cold = sub.add_parser("cold-items", help="make a random fraction of the items cold", description=DESCRIPTION,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    cold.add_argument("--fraction", type=float, required=True, help="fraction of the items made cold, in (0, 1)")
    few = sub.add_parser("few-shot", help="keep a random fraction of the users", description=DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    few.add_argument("--users", type=float, required=True, help="fraction of the users kept, in (0, 1)")
    for p in (cold, few):
        p.add_argument("domain", metavar="DOMAIN_DIR", help="processed domain folder")
        p.add_argument("--seed", type=int, default=0, help="seed of the random choice (default 0)")
        p.add_argument("--out", required=True, metavar="DIR", help="folder of the split domain")


def run(args: argparse.Namespace) -> int:
    from reolm.data.domain import read_domain
    from reolm.data.splits import cold_item_split, few_shot_split, write_split

    source = Path(args.domain)
    domain = read_domain(source)
    if args.kind == "cold-items":
        split, record, cold_ids = cold_item_split(domain, args.fraction, args.seed)
    else:
        (split, record), cold_ids = few_shot_split(domain, args.users, args.seed), None
    out = write_split(split, source, args.out, record, cold_ids)
    summary = {k: v for k, v in record.items() if k not in ("source", "created")}
    print(json.dumps({"wrote": str(out), **summary}))
    return 0
