"""reolm report RUN_DIR... : results table (markdown), grouped bar chart, training curves."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reolm.io import write_text

DESCRIPTION = ("Read RUN_DIR/metrics.json of each run (launch/finetune.py output) and write the paper's "
               "Table 2 layout as markdown: rows = datasets x N@10/R@10/MRR, columns = models, the best "
               "value of each row in bold, and the improvement of Reo-LM over the best baseline in %. "
               "Runs on split domains (reolm split) get a table per setting (warm, cold-items, few-shot); "
               "each setting also shows NDCG@10 by how often the target occurs in training and says which "
               "model wins. "
               "Optionally a grouped bar chart (--plot), training curves from each run's log.jsonl "
               "(--curves) and the table as JSON (--json).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or their metrics.json)")
    parser.add_argument("--out", metavar="FILE.md", help="write the markdown table here (default: print it)")
    parser.add_argument("--plot", metavar="FILE.png", help="grouped bar chart of the table")
    parser.add_argument("--curves", metavar="FILE.png", help="training loss and validation NDCG@10 per epoch")
    parser.add_argument("--json", metavar="FILE", help="the table as JSON (values, best, improvement)")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def run(args: argparse.Namespace) -> int:
    from reolm.eval.report import build_table, format_report, load_runs, plot_bars, plot_curves, report_json

    docs = load_runs(args.runs)
    markdown = format_report(docs)
    if args.out:
        _write_text(Path(args.out), markdown)
        print(f"wrote {args.out}")
    else:
        print(markdown, end="")
    if args.json:
        _write_text(Path(args.json), json.dumps(report_json(docs), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        # One chart for all settings: a split domain's bars are labelled "Scientific (cold-items)".
        labelled = [{**d, "domain": d["domain"] if d.get("setting", "warm") == "warm"
                     else f"{d['domain']} ({d['setting']})"} for d in docs]
        print(f"wrote {plot_bars(build_table(labelled), args.plot)}")
    if args.curves:
        runs = [Path(r).parent if Path(r).is_file() else Path(r) for r in args.runs]
        print(f"wrote {plot_curves(runs, args.curves)}")
    return 0
