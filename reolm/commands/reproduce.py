"""reolm reproduce: the paper's recipe end to end (raw Amazon 2018 files -> Slurm pre-training -> Table 2)."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from reolm.config import config_help_epilog
from reolm.recipe import RecipeConfig

DESCRIPTION = """The paper's recipe end to end: Amazon 2018 raw files -> pre-training on Slurm -> Table 2.

    reolm reproduce --config launch/configs/reproduce/paper.yaml \\
        backbone=/models/MiniLM-L12-H384 vision=/models/clip-vit-base-patch16 --dry-run

--dry-run prints every command with its inputs (and whether each exists or which earlier stage
makes it) and the expected pre-training GPU-hours; without it the stages run in order, finished
ones skipped, so the same command resumes. docs/reproduce.md explains every stage.

At tiny scale, with inputs made on this machine (raw files, their images served on 127.0.0.1,
random-weight models from `reolm init`) and the same stages (`make reproduce-tiny`):

    reolm reproduce --config launch/configs/reproduce/tiny.yaml --tiny-inputs

(`python launch/reproduce.py ...` is the same command.)"""


def epilog() -> str:
    return config_help_epilog(RecipeConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="recipe YAML (repeatable; later files override earlier ones)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and their inputs; run nothing")
    parser.add_argument("--tiny-inputs", action="store_true",
                        help="first write small raw Amazon 2018 files into raw_dir, a tokenizer and random-weight "
                             "backbone/vision models (reolm init), and serve the images on 127.0.0.1 while the "
                             "recipe runs (reolm/tiny_amazon.py; the tiny preset)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. nodes=4")


def run(args: argparse.Namespace) -> int:
    from reolm.pipeline import print_plan, run_stages
    from reolm.recipe import load_recipe, print_results, recipe_stages
    from reolm.tiny_amazon import serve_tiny_inputs
    with contextlib.ExitStack() as stack:
        cfg = load_recipe(args.config, args.overrides)
        stages = recipe_stages(cfg)
        if args.tiny_inputs:
            server, stages = stack.enter_context(serve_tiny_inputs(cfg, stages))
        if args.dry_run:
            print_plan(stages, run_dir=Path(cfg.work_dir))
            return 0
        if args.tiny_inputs:
            print(f"serving the tiny inputs' images on 127.0.0.1:{server.port}", flush=True)
        run_stages(Path(cfg.work_dir), stages, resume_hint="fix the cause and run the same command again to resume")
        if args.tiny_inputs:
            print(f"image server: {server.requests}")
    print_results(cfg)
    return 0
