#!/usr/bin/env python
"""The paper's recipe end to end: Amazon 2018 raw files -> pre-training on Slurm -> Table 2.

    python launch/reproduce.py --config launch/configs/reproduce/paper.yaml \
        backbone=/models/MiniLM-L12-H384 vision=/models/clip-vit-base-patch16 --dry-run

--dry-run prints every command with its inputs (and whether each exists or which earlier stage
makes it) and the expected pre-training GPU-hours; without it the stages run in order, finished
ones skipped, so the same command resumes. docs/reproduce.md explains every stage.

At tiny scale, with inputs made on this machine (raw files, their images served on 127.0.0.1,
random-weight models from `reolm init`) and the same stages:

    python launch/reproduce.py --config launch/configs/reproduce/tiny.yaml --tiny-inputs
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reolm.config import config_help_epilog  # noqa: E402
from reolm.recipe import RecipeConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=config_help_epilog(RecipeConfig))
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="recipe YAML (repeatable; later files override earlier ones)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and their inputs; run nothing")
    parser.add_argument("--tiny-inputs", action="store_true",
                        help="first write small raw Amazon 2018 files into raw_dir, a tokenizer and random-weight "
                             "backbone/vision models (reolm init), and serve the images on 127.0.0.1 while the "
                             "recipe runs (reolm/tiny_amazon.py; the tiny preset)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. nodes=4")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from reolm.pipeline import print_plan, run_stages
    from reolm.recipe import load_recipe, print_results, recipe_stages
    from reolm.tiny_amazon import serve_tiny_inputs
    with contextlib.ExitStack() as stack:
        try:
            cfg = load_recipe(args.config, args.overrides)
            stages = recipe_stages(cfg)
            if args.tiny_inputs:
                server, stages = stack.enter_context(serve_tiny_inputs(cfg, stages))
        except (ValueError, OSError) as err:
            print(f"reproduce: error: {err}", file=sys.stderr)
            return 1
        if args.dry_run:
            print_plan(stages)
            return 0
        if args.tiny_inputs:
            print(f"serving the tiny inputs' images on 127.0.0.1:{server.port}", flush=True)
        run_stages(Path(cfg.work_dir), stages, resume_hint="fix the cause and run the same command again to resume")
        if args.tiny_inputs:
            print(f"image server: {server.requests}")
    print_results(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
