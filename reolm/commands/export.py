"""reolm export {checkpoint,backbone,unisrec} : write our models or data in other projects' formats."""

from __future__ import annotations

import argparse

from reolm.data.interop import export_unisrec

DESCRIPTION = """Export in other projects' formats.

  reolm export checkpoint CKPT OUT     a pre-training checkpoint as an HF-style directory (config.json,
  reolm export CKPT OUT                model.safetensors, tokenizer) that fine-tuning loads with --init;
                                       ZeRO-3 shards are consolidated through DeepSpeed

  reolm export backbone HF_DIR OUT     a plain BERT/RoBERTa/MiniLM checkpoint as a Reo-LM export without
     [KEY=VALUE ...]                   pre-training (model settings as KEY=VALUE, e.g. max_tokens=512):
                                       evaluates zero-shot as plm-zeroshot, exactly like
                                       `launch/evaluate.py --model HF_DIR`, and fine-tunes with --init

  reolm export unisrec DIR --out D     a processed domain as RecBole atomic files (UniSRec/MISSRec layout),
                                       same users, items and leave-one-out splits, so baselines run on our splits
"""


KINDS = ("checkpoint", "backbone", "unisrec")


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
    bb = sub.add_parser("backbone", help="a plain HF checkpoint as a Reo-LM export (no pre-training)",
                        description="Write the fresh Reo-LM that zero-shot evaluation builds on HF_DIR "
                                    "(PLM weights, zero adapters, the image token's parameters drawn "
                                    "from a fixed seed) as an export: config.json records origin "
                                    "'backbone', so launch/evaluate.py names it plm-zeroshot.")
    bb.add_argument("backbone", metavar="HF_DIR", help="local HF BERT/RoBERTa checkpoint directory")
    bb.add_argument("out", metavar="OUT", help="output directory (replaced if it exists)")
    bb.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="ModelConfig settings, e.g. max_tokens=512 image_feature_dim=768")
    bb.add_argument("--debug", action="store_true", help="show tracebacks")
    bb.set_defaults(handler=_run_backbone)
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


def _run_backbone(args: argparse.Namespace) -> int:
    from reolm.config import load_config
    from reolm.data.tables import load_tokenizer
    from reolm.finetune.reolm_recommender import fresh_plm
    from reolm.model import ModelConfig
    from reolm.saved import BACKBONE_ORIGIN

    model = fresh_plm(args.backbone, load_config(ModelConfig, [], args.overrides))
    out = model.save_pretrained(args.out, load_tokenizer(args.backbone),
                                extra_config={"origin": BACKBONE_ORIGIN, "origin_dir": args.backbone})
    print(f"exported {args.backbone} -> {out} (no pre-training; evaluates as plm-zeroshot)")
    return 0


def _run_unisrec(args: argparse.Namespace) -> int:
    counts = export_unisrec(args.domain, args.out, prefix=args.prefix, max_history=args.max_history)
    print(", ".join(f"{k}={v:,}" for k, v in counts.items()))
    print(f"wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    return args.handler(args)
