"""The ``reolm`` console command: ``reolm <command> [options]``; ``reolm <command> --help``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from reolm.commands import CommandError
from reolm.runtime import setup_process

# name -> (module under reolm.commands, one-line help).  Help text lives here too so
# that `reolm --help` lists every command without importing any of them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "run the whole pipeline on an embedded synthetic corpus (what `make demo` runs)"),
    "pretrain": ("pretrain", "pre-train Reo-LM with DeepSpeed on WebDataset shards (every rank runs it)"),
    "finetune": ("finetune", "fine-tune Reo-LM or train a baseline on one domain, then test the best weights"),
    "evaluate": ("evaluate", "evaluate a saved model, an export or a plain HF checkpoint (zero-shot) by full ranking"),
    "reproduce": ("reproduce", "the paper's recipe end to end: raw Amazon 2018 files -> Slurm pre-training -> Table 2"),
    "synth": ("synth", "generate a synthetic multi-domain corpus of processed domain folders"),
    "stats": ("stats", "print the dataset statistics table of processed domain folders"),
    "split": ("split", "derive a cold-item or few-shot version of a processed domain folder"),
    "shard": ("shard", "write processed domains into a WebDataset corpus (items, train, dev shards)"),
    "verify": ("verify", "re-read every shard of a corpus and check it against its manifest"),
    "tokenizer": ("tokenizer", "train a small WordPiece/BPE tokenizer on a corpus (the embedded default)"),
    "init": ("init", "write a random-weight backbone (from a tokenizer) or vision checkpoint directory"),
    "tables": ("tables", "build derived item tables: token table (per tokenizer), image features (per vision model)"),
    "prepare": ("prepare", "turn raw Amazon Reviews 2018 files into a processed domain folder"),
    "import": ("import_", "import Recformer / UniSRec data or precomputed image features"),
    "export": ("export", "export a training checkpoint or an HF backbone as a Reo-LM directory, or a domain "
                         "to UniSRec files"),
    "report": ("report", "build the results table and plots from run directories"),
    "embed": ("embed", "encode every item of a domain with a trained Reo-LM into vectors + a FAISS index"),
    "serve": ("serve", "serve recommendations over HTTP (recommend, add/delete items live, health, metrics)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reolm",
        description="Reo-LM: pre-train, fine-tune and evaluate a multi-modal language model for "
                    "recommendation. Each command has its own --help.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    if argv[0] == "--version":
        from reolm import __version__
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        build_parser().print_usage(sys.stderr)
        print(f"reolm: unknown command {name!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, help_text = COMMANDS[name]
    setup_process()
    module = importlib.import_module(f"reolm.commands.{module_name}")
    parser = argparse.ArgumentParser(prog=f"reolm {name}", description=getattr(module, "DESCRIPTION", help_text),
                                     epilog=getattr(module, "epilog", lambda: None)(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    # A command may rewrite its arguments first (e.g. `reolm export CKPT OUT` -> `export checkpoint ...`).
    rest = getattr(module, "normalize_args", lambda argv: argv)(rest)
    args = parser.parse_intermixed_args(rest) if getattr(module, "INTERMIXED", False) else parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, CommandError) as err:
        # Library errors (DomainError, ConfigError, ShardError, ...) are ValueErrors with a
        # message written for the user, and OSErrors name their file: print the message without
        # a traceback, unless --debug or REOLM_DEBUG=1 asks for one.
        if getattr(args, "debug", False) or debug_requested():
            raise
        print(f"reolm {name}: error{rank_suffix()}: {err}", file=sys.stderr)
        return 1


def rank_suffix() -> str:
    """' (rank N)' in a multi-process job (pre-training), so each rank's message says whose it is."""
    return f" (rank {os.environ.get('RANK', '0')})" if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""


def debug_requested() -> bool:
    """REOLM_DEBUG set to anything but '' or '0': show tracebacks instead of one-line errors."""
    return os.environ.get("REOLM_DEBUG", "") not in ("", "0")


if __name__ == "__main__":
    raise SystemExit(main())
