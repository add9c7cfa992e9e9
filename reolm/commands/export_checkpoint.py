"""reolm export checkpoint CKPT OUT: a training checkpoint -> HF-style directory (config + safetensors +
tokenizer).

Wired as the ``checkpoint`` kind of ``reolm export`` (reolm/commands/export.py):
``add_arguments`` fills that sub-parser and ``run`` handles it.
"""

from __future__ import annotations

import argparse

HELP = "export a training checkpoint to an HF-style directory"
DESCRIPTION = """\
reolm export checkpoint CKPT OUT

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
