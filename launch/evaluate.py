#!/usr/bin/env python
"""Evaluate a saved model (RUN_DIR or RUN_DIR/best of any model kind) by full ranking.

    python launch/evaluate.py --domain data/Scientific --model runs/sci-sasrec --split test --out sci.json

Uses the run's own evaluation settings (best/config.yaml) unless eval.* overrides are given;
writes a metrics document (reolm.eval.contract) to --out and prints NDCG@10/Recall@10/MRR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reolm.config import config_help_epilog  # noqa: E402
from reolm.finetune.config import EvalSection  # noqa: E402
from reolm.finetune.registry import NotImplementedModel  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=config_help_epilog(EvalSection).replace("\n  ", "\n  eval."))
    parser.add_argument("--domain", required=True, metavar="DIR", help="processed domain folder")
    parser.add_argument("--model", required=True, metavar="RUN_OR_EXPORT_DIR",
                        help="run directory, its best/ folder, or another saved model folder")
    parser.add_argument("--split", choices=("val", "test"), default="test", help="split to rank (default test)")
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the metrics JSON")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="eval.key=value", help="evaluation overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from reolm.eval.contract import write_metrics
        from reolm.finetune.runner import evaluate_saved
        doc = evaluate_saved(args.model, args.domain, args.split, args.overrides, device=args.device,
                             progress=not args.no_progress)
        write_metrics(args.out, doc, run=False)
    except NotImplementedModel as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 1
    summary = {k: round(v, 4) for k, v in doc["metrics"].items() if k in ("NDCG@10", "Recall@10", "MRR")}
    print(json.dumps({"model": doc["model"], "domain": doc["domain"], "split": doc["split"], **summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
