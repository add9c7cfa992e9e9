"""reolm export CKPT OUT: a training checkpoint -> HF-style directory (config + safetensors + tokenizer).

The lead wires this module under `reolm export` (reolm/commands/export.py dispatches to it).
"""

from __future__ import annotations

import argparse

HELP = "export a training checkpoint to an HF-style directory"
DESCRIPTION = """\
reolm export CKPT OUT

CKPT is a checkpoint folder (RUN/checkpoints/step-00001000), a checkpoints folder or a run
directory (the newest complete checkpoint is used). The weights are consolidated through
DeepSpeed (fp32 master weights, also for ZeRO-3 sharded parameters) on one CPU process; OUT
gets config.json, model.safetensors and the tokenizer files, loadable with
ReoLM.from_pretrained(OUT)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint folder, checkpoints folder or run directory")
    parser.add_argument("out", metavar="OUT", help="output directory (replaced if it exists)")


def run(args: argparse.Namespace) -> int:
    from reolm.train.export import export_checkpoint, find_checkpoint

    ckpt = find_checkpoint(args.checkpoint)
    out = export_checkpoint(ckpt, args.out)
    print(f"exported {ckpt} -> {out}")
    return 0
