"""reolm verify: re-read every shard of a corpus and check it against its manifest."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Re-read every items/train/dev shard of a corpus: file size and sha256 against
the manifest, sample counts, every json decoded and checked (item keys follow
the global index, sequence items belong to their domain, dev has a target),
every image decoded. Prints each problem as `SHARD: key KEY: what` and exits 1
if there is any (a truncated or corrupted tar is named)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("corpus", help="corpus folder (holding manifest.json)")
    parser.add_argument("--max-problems", type=int, default=50, help="problems to print (default 50)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from reolm.data.shards import verify_corpus

    report = verify_corpus(args.corpus, progress=not args.quiet)
    counts = ", ".join(f"{k} {v:,}" for k, v in report.counts.items())
    if report.ok:
        print(f"{args.corpus}: OK ({counts})")
        return 0
    for line in report.problems[:args.max_problems]:
        print(line, file=sys.stderr)
    more = len(report.problems) - args.max_problems
    if more > 0:
        print(f"... and {more} more", file=sys.stderr)
    print(f"{args.corpus}: {len(report.problems)} problem(s) ({counts})", file=sys.stderr)
    return 1
