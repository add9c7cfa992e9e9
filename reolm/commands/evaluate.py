"""reolm evaluate: evaluate a saved model (any kind) or a plain checkpoint zero-shot by full ranking."""

from __future__ import annotations

import argparse
import json

from reolm.config import config_help_epilog
from reolm.finetune.config import EvalSection
from reolm.precision import PRECISION_DOC, PRECISIONS

DESCRIPTION = """Evaluate a saved model (RUN_DIR or RUN_DIR/best of any model kind) by full ranking.

    reolm evaluate --domain data/Scientific --model runs/sci-sasrec --split test --out sci.json
    reolm evaluate --domain data/Scientific --model /models/MiniLM --max-users 1000 --seed 0 \\
        --out plm.json        # a plain HF checkpoint, zero-shot: "plm-zeroshot"

Uses the run's own evaluation settings (best/config.yaml) unless eval.* overrides are given;
writes a metrics document (reolm.eval.contract) to --out and prints NDCG@10/Recall@10/MRR.
(`python launch/evaluate.py ...` is the same command.)"""


def epilog() -> str:
    return config_help_epilog(EvalSection).replace("\n  ", "\n  eval.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", required=True, metavar="DIR", help="processed domain folder")
    parser.add_argument("--model", required=True, metavar="RUN_OR_EXPORT_DIR",
                        help="run directory, its best/ folder, another saved model folder, a Reo-LM export "
                             "(reolm-zeroshot) or a plain HF BERT/RoBERTa checkpoint (plm-zeroshot)")
    parser.add_argument("--split", choices=("val", "test"), default="test", help="split to rank (default test)")
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the metrics JSON")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="Reo-LM / PLM encoding precision (default auto). " + PRECISION_DOC)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--max-users", type=int, metavar="N",
                        help="evaluate a random subset of N users (same as eval.max_users=N)")
    parser.add_argument("--seed", type=int, metavar="S", help="seed of that subset (eval.subset_seed=S)")
    parser.add_argument("overrides", nargs="*", metavar="eval.key=value",
                        help="evaluation overrides (eval.*; for an HF checkpoint also reolm.model.*, e.g. "
                             "reolm.model.pooling=mean)")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    overrides += [f"eval.max_users={args.max_users}"] if args.max_users is not None else []
    overrides += [f"eval.subset_seed={args.seed}"] if args.seed is not None else []
    from reolm.eval.contract import write_metrics
    from reolm.finetune.runner import evaluate_saved
    doc = evaluate_saved(args.model, args.domain, args.split, overrides, device=args.device,
                         progress=not args.no_progress, precision=args.precision)
    write_metrics(args.out, doc, run=False)
    summary = {k: round(v, 4) for k, v in doc["metrics"].items() if k in ("NDCG@10", "Recall@10", "MRR")}
    print(json.dumps({"model": doc["model"], "domain": doc["domain"], "split": doc["split"],
                      "num_users": doc["num_users"], **summary}))
    return 0
