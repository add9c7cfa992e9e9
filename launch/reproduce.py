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
    from reolm.recipe import load_recipe, recipe_stages
    try:
        cfg = load_recipe(args.config, args.overrides)
        stages = recipe_stages(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"reproduce: error: {err}", file=sys.stderr)
        return 1
    hint = "fix the cause and run the same command again to resume"
    if args.tiny_inputs:
        from reolm.tiny_amazon import ImageServer, recorded_port, tiny_input_stages
        try:
            server = ImageServer(recorded_port(cfg.raw_dir) or 0)
        except OSError as err:
            print(f"reproduce: error: cannot serve the tiny inputs' images on 127.0.0.1 ({err}); the port is "
                  f"recorded in {Path(cfg.raw_dir) / 'image_server.json'}", file=sys.stderr)
            return 1
        with server:
            stages = tiny_input_stages(cfg, server.port) + stages
            if args.dry_run:
                print_plan(stages)
                return 0
            print(f"serving the tiny inputs' images on 127.0.0.1:{server.port}", flush=True)
            run_stages(Path(cfg.work_dir), stages, resume_hint=hint)
            print(f"image server: {server.requests}")
    elif args.dry_run:
        print_plan(stages)
        return 0
    else:
        run_stages(Path(cfg.work_dir), stages, resume_hint=hint)
    results = Path(cfg.work_dir).resolve() / "results"
    for name in ("datasets.md", "table2.md"):
        print(f"\n{results / name}:\n{(results / name).read_text()}")
    print(f"done: {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
