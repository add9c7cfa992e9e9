"""reolm init backbone|vision : random-weight local checkpoints (no download)."""

from __future__ import annotations

import argparse

from reolm.random_init import BACKBONE_SIZES, init_backbone, init_vision

DESCRIPTION = ("Write Hugging Face checkpoint directories with random weights, for pre-training from scratch "
               "and for the demo (nothing is ever downloaded). Real checkpoints are local directories you "
               "point the configs to instead.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="{backbone,vision}")
    b = sub.add_parser("backbone", help="BERT/RoBERTa masked LM sized to a local tokenizer")
    b.add_argument("--tokenizer", required=True, help="HF tokenizer directory (e.g. from `reolm tokenizer train`)")
    b.add_argument("--out", required=True, help="output checkpoint directory")
    b.add_argument("--size", default="mini", choices=list(BACKBONE_SIZES),
                   help="layers/hidden preset: " + ", ".join(f"{k}={v[0]}x{v[1]}" for k, v in BACKBONE_SIZES.items()))
    b.add_argument("--arch", default="bert", choices=["bert", "roberta"])
    b.add_argument("--max-positions", type=int, default=512, help="position table length")
    b.add_argument("--seed", type=int, default=0)
    v = sub.add_parser("vision", help="small ViT image encoder + image processor")
    v.add_argument("--out", required=True, help="output checkpoint directory")
    v.add_argument("--image-size", type=int, default=32)
    v.add_argument("--hidden", type=int, default=64)
    v.add_argument("--layers", type=int, default=2)
    v.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.what == "backbone":
        path = init_backbone(args.tokenizer, args.out, args.size, args.arch, args.max_positions, args.seed)
    else:
        path = init_vision(args.out, image_size=args.image_size, hidden=args.hidden, layers=args.layers,
                           seed=args.seed)
    print(f"wrote {path}")
    return 0
