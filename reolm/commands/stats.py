"""reolm stats DIR... : the paper's dataset table for processed domain folders."""

from __future__ import annotations

import argparse
import json
import sys

from reolm.data.domain import domain_stats, format_stats_table, read_domain, resolve_domain_dirs

DESCRIPTION = ("Print #Users, #Items, #Img (coverage), #Inters (train + val + test items) and Avg.SL for each "
               "processed domain folder, as a markdown table (or JSON with --json).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domains", nargs="+", metavar="DIR", help="processed domain folders, or a corpus folder written by `reolm synth`")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a markdown table")
    parser.add_argument("--no-validate", action="store_true", help="skip the consistency checks (faster)")


def run(args: argparse.Namespace) -> int:
    dirs = resolve_domain_dirs(args.domains, warn=lambda msg: print(msg, file=sys.stderr))
    rows = [domain_stats(read_domain(d, validate=not args.no_validate, load_features=False)) for d in dirs]
    print(json.dumps(rows, indent=2) if args.json else format_stats_table(rows))
    return 0
