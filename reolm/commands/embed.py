"""reolm embed items : a trained Reo-LM's vectors of every item of a domain, and a FAISS index."""

from __future__ import annotations

import argparse
import json

from reolm.config import config_help_epilog

DESCRIPTION = """\
reolm embed items --model RUN_OR_EXPORT --domain DIR --out INDEX_DIR [--index flat|hnsw|ivf] [key=value ...]

Encodes every item of the processed domain folder with the model (a fine-tuning run directory, its
best/ folder, or a pre-trained export evaluated zero-shot) and writes INDEX_DIR: L2-normalised item
vectors with the item ids and the identity of the model and tables that produced them
(vectors-*.safetensors), the FAISS index (index-*.faiss: exact inner product, or HNSW / IVF
approximate), the items' token rows and image features, and index.json. A fine-tuning run's vectors
are its frozen stage-2 item table, the vectors its evaluation ranked. See docs/serving.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from reolm.serve.config import INDEX_KINDS, EmbedConfig

    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    items = sub.add_parser("items", help="item vectors + FAISS index of a domain", description=DESCRIPTION,
                           epilog=config_help_epilog(EmbedConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    items.add_argument("--model", required=True, metavar="RUN_OR_EXPORT", help="fine-tuning run dir or Reo-LM export")
    items.add_argument("--domain", required=True, metavar="DIR", help="processed domain folder whose items to embed")
    items.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder to write (replaced if it is one)")
    items.add_argument("--index", choices=INDEX_KINDS, help="index kind (shorthand for index.kind=...)")
    items.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config file (repeatable)")
    items.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. index.hnsw_m=16")
    items.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from reolm.config import load_config
    from reolm.serve.config import EmbedConfig
    from reolm.serve.embed import embed_items

    overrides = list(args.overrides) + ([f"index.kind={args.index}"] if args.index else [])
    cfg = load_config(EmbedConfig, args.config, overrides)
    manifest = embed_items(args.model, args.domain, args.out, cfg)
    print(json.dumps({"index_dir": str(args.out), "items": manifest["items"], "dim": manifest["dim"],
                      "index": manifest["index"]["kind"], "model": manifest["model"]["kind"],
                      "item_vectors": manifest["model"]["item_vectors"], "timings_s": manifest["timings_s"]}))
    return 0
