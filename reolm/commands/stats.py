"""reolm stats DIR... : the paper's dataset table for processed domain folders."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reolm.data.domain import domain_stats, format_stats_table, read_domain, resolve_domain_dirs
from reolm.io import write_text

DESCRIPTION = ("Print #Users, #Items, #Img (coverage), #Inters (train + val + test items) and Avg.SL for each "
               "processed domain folder, as a markdown table (or JSON with --json), plus the cold items "
               "(val/test items never in training) unless --paper-layout.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domains", nargs="+", metavar="DIR", help="processed domain folders, or a corpus folder written by `reolm synth`")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a markdown table")
    parser.add_argument("--paper-layout", action="store_true",
                        help="exactly the paper's columns (Dataset, #Users, #Items, #Img (Cover./%%), #Inters, Avg.SL)")
    parser.add_argument("--out", metavar="FILE.md", help="also write the markdown table to FILE.md")
    parser.add_argument("--json-out", metavar="FILE.json", help="also write the rows as JSON to FILE.json")
    parser.add_argument("--no-validate", action="store_true", help="skip the consistency checks (faster)")


def run(args: argparse.Namespace) -> int:
    dirs = resolve_domain_dirs(args.domains, warn=lambda msg: print(msg, file=sys.stderr))
    rows = [domain_stats(read_domain(d, validate=not args.no_validate, load_features=False)) for d in dirs]
    table = format_stats_table(rows, paper_layout=args.paper_layout)
    print(json.dumps(rows, indent=2) if args.json else table)
    # The JSON first: the markdown file marks the stage done in pipelines.
    for path, text in ((args.json_out, json.dumps(rows, indent=2) + "\n"), (args.out, table + "\n")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_text(Path(path), text)
    return 0
