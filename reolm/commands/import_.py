"""reolm import {recformer,unisrec,features} : bring processed data from other projects in."""

from __future__ import annotations

import argparse

from reolm.commands._ingest_common import (add_image_arguments, add_output_arguments, add_unescape_argument,
                                           attach_images, check_output, write_and_summarise)
from reolm.data.images import import_features
from reolm.data.interop import import_recformer, import_unisrec

DESCRIPTION = """Import data processed by other projects as a processed domain folder, or attach
precomputed image features to one.  Every import validates its input and reports what it read,
kept and dropped (and why); the report is also saved in domain.json.

  reolm import recformer SRC --name NAME --out DIR      Recformer finetune folder (train/val/test/smap/umap/meta_data.json)
  reolm import unisrec SRC --name NAME --out DIR        UniSRec/MISSRec atomic files (NAME.train.inter, ...)
  reolm import features --domain DIR --features F.npy   image features aligned by item index (or --ids)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)

    rec = sub.add_parser("recformer", help="a Recformer processed folder",
                         description="Import Recformer's train.json, val.json, test.json, smap.json, umap.json "
                                     "(optional) and meta_data.json; 0-based (or 1-based, shifted) item indices.")
    rec.add_argument("source", metavar="SRC", help="the Recformer data folder")
    add_unescape_argument(rec)
    add_output_arguments(rec)
    add_image_arguments(rec)
    rec.set_defaults(handler=_run_recformer)

    uni = sub.add_parser("unisrec", help="UniSRec / MISSRec RecBole atomic files",
                         description="Import NAME.train.inter / .valid.inter / .test.inter, NAME.text, "
                                     "NAME.item2index, NAME.user2index and, when present, MISSRec's raw float32 "
                                     "NAME.feat3CLS image features (all-zero row = no image).  The augmented "
                                     "train rows are folded back into one sequence per user and checked.")
    uni.add_argument("source", metavar="SRC", help="folder holding the atomic files")
    uni.add_argument("--prefix", help="file name prefix NAME (default: the folder name, or the only *.train.inter)")
    uni.add_argument("--image-suffix", default="feat3CLS",
                     help="suffix of the image feature file (default feat3CLS; feat1CLS is text, not images)")
    add_output_arguments(uni)
    add_image_arguments(uni)
    uni.set_defaults(handler=_run_unisrec)

    feats = sub.add_parser("features", help="precomputed image features for a processed domain",
                           description="Write DIR/image_features.npy (float16) and DIR/has_image.npy from a "
                                       "[rows, d] .npy file whose rows align with item indices (smap.json) or "
                                       "with the item ids in --ids.  Without --mask, an all-zero row = no image.")
    feats.add_argument("--domain", required=True, metavar="DIR", help="processed domain folder")
    feats.add_argument("--features", required=True, metavar="F.npy", help="float features [rows, d]")
    feats.add_argument("--mask", metavar="M.npy", help="bool [rows]: which rows hold a real image")
    feats.add_argument("--ids", metavar="FILE", help="item id of each row (.json list or one per line)")
    feats.set_defaults(handler=_run_features)
    for p in (rec, uni, feats):
        p.add_argument("--debug", action="store_true", help="show tracebacks")


def _run_recformer(args: argparse.Namespace) -> int:
    out = check_output(args.out, args.force)
    domain, report = import_recformer(args.source, args.name, unescape_html=args.unescape_html)
    attach_images(domain, out, args, report)
    return write_and_summarise(domain, out, report)


def _run_unisrec(args: argparse.Namespace) -> int:
    out = check_output(args.out, args.force)
    domain, report = import_unisrec(args.source, args.name, prefix=args.prefix, image_suffix=args.image_suffix)
    attach_images(domain, out, args, report)
    return write_and_summarise(domain, out, report)


def _run_features(args: argparse.Namespace) -> int:
    report = import_features(args.domain, args.features, args.mask, args.ids)
    print(report.summary())
    print(f"wrote {args.domain}/image_features.npy and has_image.npy")
    return 0


def run(args: argparse.Namespace) -> int:
    return args.handler(args)
