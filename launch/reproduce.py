#!/usr/bin/env python
"""The paper's recipe end to end: Amazon 2018 raw files -> pre-training on Slurm -> Table 2.

    python launch/reproduce.py --config launch/configs/reproduce/paper.yaml \
        backbone=/models/MiniLM-L12-H384 vision=/models/clip-vit-base-patch16 --dry-run

--dry-run prints every command with its inputs (and whether each exists or which earlier stage
makes it) and the expected pre-training GPU-hours; without it the stages run in order, finished
ones skipped, so the same command resumes. docs/reproduce.md explains every stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reolm.config import config_help_epilog
from reolm.recipe import RecipeConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=config_help_epilog(RecipeConfig))
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="recipe YAML (repeatable; later files override earlier ones)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and their inputs; run nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. nodes=4")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from reolm.pipeline import print_plan, run_stages
    from reolm.recipe import load_recipe, recipe_stages
    try:
        cfg = load_recipe(args.config, args.overrides)
        stages = recipe_stages(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"reproduce: error: {err}", file=sys.stderr)
        return 1
    if args.dry_run:
        print_plan(stages)
        return 0
    run_stages(Path(cfg.work_dir), stages, resume_hint="fix the cause and run the same command again to resume")
    print(f"done: {Path(cfg.work_dir) / 'results' / 'table2.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
