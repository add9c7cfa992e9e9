"""reolm export {unisrec,...} : write our data or models in other projects' formats."""

from __future__ import annotations

import argparse

from reolm.data.interop import export_unisrec

HELP = "export a training checkpoint to an HF-style directory, or a domain to UniSRec files"
DESCRIPTION = """Export in other projects' formats.

  reolm export unisrec DIR --out D     a processed domain as RecBole atomic files (UniSRec/MISSRec layout),
                                       same users, items and leave-one-out splits, so baselines run on our splits
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    uni = sub.add_parser("unisrec", help="a processed domain as UniSRec/RecBole atomic files",
                         description="Write NAME.train.inter (UniSRec's augmented prefixes), NAME.valid.inter, "
                                     "NAME.test.inter, NAME.text, NAME.item2index, NAME.user2index and, when the "
                                     "domain has image features, NAME.feat3CLS (raw float32, zero row = no image). "
                                     "Tokens are our 0-based user/item indices.")
    uni.add_argument("domain", metavar="DIR", help="processed domain folder")
    uni.add_argument("--out", required=True, metavar="D", help="output folder")
    uni.add_argument("--prefix", help="file name prefix (default: the domain name)")
    uni.add_argument("--max-history", type=int, default=50, help="history items per row (UniSRec uses 50)")
    uni.add_argument("--debug", action="store_true", help="show tracebacks")
    uni.set_defaults(handler=_run_unisrec)


def _run_unisrec(args: argparse.Namespace) -> int:
    counts = export_unisrec(args.domain, args.out, prefix=args.prefix, max_history=args.max_history)
    print(", ".join(f"{k}={v:,}" for k, v in counts.items()))
    print(f"wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    return args.handler(args)
