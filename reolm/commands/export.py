"""reolm export {checkpoint,unisrec} : write our models or data in other projects' formats."""

from __future__ import annotations

import argparse

from reolm.data.interop import export_unisrec

HELP = "export a training checkpoint to an HF-style directory, or a domain to UniSRec files"
DESCRIPTION = """Export in other projects' formats.

  reolm export checkpoint CKPT OUT     a pre-training checkpoint as an HF-style directory (config.json,
  reolm export CKPT OUT                model.safetensors, tokenizer) that fine-tuning loads with --init;
                                       ZeRO-3 shards are consolidated through DeepSpeed

  reolm export unisrec DIR --out D     a processed domain as RecBole atomic files (UniSRec/MISSRec layout),
                                       same users, items and leave-one-out splits, so baselines run on our splits
"""


KINDS = ("checkpoint", "unisrec")


def normalize_args(argv: list[str]) -> list[str]:
    """``reolm export CKPT OUT`` (the short form) means ``reolm export checkpoint CKPT OUT``."""
    if argv and argv[0] not in KINDS and not argv[0].startswith("-"):
        return ["checkpoint", *argv]
    return argv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from reolm.commands import export_checkpoint

    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    ckpt = sub.add_parser("checkpoint", help=export_checkpoint.HELP, description=export_checkpoint.DESCRIPTION,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    export_checkpoint.add_arguments(ckpt)
    ckpt.set_defaults(handler=export_checkpoint.run)
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
