"""reolm finetune: fine-tune Reo-LM or train a baseline on one processed domain, then test it."""

from __future__ import annotations

import argparse
import dataclasses
import json

from reolm.config import config_help_epilog, load_config
from reolm.finetune.config import MODEL_CHOICES, FinetuneConfig

DESCRIPTION = """Fine-tune Reo-LM or train a baseline on one processed domain, then test the best weights.

    reolm finetune --domain data/Scientific --out runs/sci-sasrec --model sasrec
    reolm finetune --domain data/Scientific --out runs/sci-bert4rec \\
        --config launch/configs/finetune/baselines.yaml --model bert4rec train.lr=5e-4

Writes RUN_DIR/config.yaml, log.jsonl, best/ (loadable by `reolm evaluate`) and metrics.json.
(`python launch/finetune.py ...` is the same command.)"""


def epilog() -> str:
    return config_help_epilog(FinetuneConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", required=True, metavar="DIR", help="processed domain folder")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create or overwrite")
    parser.add_argument("--model", choices=MODEL_CHOICES, help="model kind (overrides the config's model key)")
    parser.add_argument("--init", metavar="EXPORT_DIR", help="Reo-LM only: pre-trained export to start from")
    parser.add_argument("--backbone", metavar="HF_DIR", help="Reo-LM only: HF checkpoint (no pre-training)")
    parser.add_argument("--item-init", metavar="RUN_OR_EXPORT",
                        help="SASRec only: start its item rows from this Reo-LM run/export's (or plain HF "
                             "checkpoint's) item vectors (= sasrec.item_init; recorded as sasrec-textinit)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config file (repeatable; later files override earlier ones)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=5e-4")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"model={args.model}"] if args.model else [])
    cfg = load_config(FinetuneConfig, args.config, overrides)
    if args.item_init:  # set after parsing: a path is not a YAML scalar to guess the type of
        if cfg.model != "sasrec":
            raise ValueError(f"--item-init applies to --model sasrec only, not {cfg.model!r}")
        cfg = dataclasses.replace(cfg, sasrec=dataclasses.replace(cfg.sasrec, item_init=args.item_init))
    from reolm.finetune.runner import run_finetune
    doc = run_finetune(cfg, args.domain, args.out, init=args.init, backbone=args.backbone)
    summary = {k: round(v, 4) for k, v in doc["metrics"].items() if k in ("NDCG@10", "Recall@10", "MRR")}
    print(json.dumps({"model": doc["model"], "domain": doc["domain"], "test": summary,
                      "best_epoch": doc.get("best_epoch"), "run_dir": str(args.out)}))
    return 0
