"""The ``RUN_DIR/metrics.json`` contract that reports and other tools read.

::

    {"model": "sasrec",            # one of MODEL_NAMES
     "domain": "Scientific",
     "split": "test",
     "num_users": 11041, "num_items": 5327,
     "ties": "optimistic",         # how "metrics" ranks ties (target wins ties)
     "metrics": {"NDCG@10": ..., "Recall@10": ..., "MRR": ..., "NDCG@5": ..., "AUC": ...},
     "metrics_pessimistic": {...same keys, ties counted against the target...},
     "best_val": {...validation metrics of the kept (best) weights...},
     "by_item_frequency": [        # the same ranks grouped by the target's number of training occurrences
         {"bucket": "0", "min": 0, "max": 0, "users": 130, "metrics": {...}, "metrics_pessimistic": {...}},
         {"bucket": "1-4", "min": 1, "max": 4, ...}, {"bucket": "5-19", ...},
         {"bucket": "20+", "min": 20, "max": null, ...}],   # metrics null when users = 0
     "setting": "warm" | "cold-items" | "few-shot" | ...,   # from the domain's split provenance
     "domain_splits": [...]}       # that provenance (reolm.data.splits), absent for an unsplit domain

Extra keys (``best_epoch``, ``evaluated_at``, ...) are allowed.  ``launch/evaluate.py``
writes the same document for any split, without ``best_val``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping

from reolm.io import read_json, write_json

__all__ = ["MODEL_NAMES", "REQUIRED_METRICS", "ContractError", "metrics_document", "validate_metrics",
           "write_metrics", "read_metrics"]

MODEL_NAMES = ("reolm", "reolm-nopretrain", "reolm-id", "reolm-nopretrain-id", "reolm-zeroshot", "plm-zeroshot",
               "sasrec", "sasrec-textinit", "gru4rec", "bert4rec", "pop")
REQUIRED_METRICS = ("NDCG@10", "Recall@10", "MRR", "NDCG@5", "AUC")


class ContractError(ValueError):
    """A metrics document does not follow the contract."""


def metrics_document(*, model: str, domain: str, split: str, num_users: int, num_items: int,
                     metrics: Mapping[str, float], metrics_pessimistic: Mapping[str, float],
                     best_val: Mapping[str, float] | None = None, **extra: Any) -> dict[str, Any]:
    """Assemble (and validate) a metrics document."""
    doc: dict[str, Any] = {"model": model, "domain": domain, "split": split, "num_users": int(num_users),
                           "num_items": int(num_items), "ties": "optimistic", "metrics": dict(metrics),
                           "metrics_pessimistic": dict(metrics_pessimistic)}
    if best_val is not None:
        doc["best_val"] = dict(best_val)
    doc.update(extra)
    doc.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    validate_metrics(doc, run=best_val is not None)
    return doc


def _check_metric_block(doc: Mapping[str, Any], key: str, where: str) -> None:
    block = doc.get(key)
    if not isinstance(block, Mapping):
        raise ContractError(f"{where}: {key!r} must be an object of metric name -> number")
    for name in REQUIRED_METRICS:
        if name not in block:
            raise ContractError(f"{where}: {key}.{name} is missing")
    for name, value in block.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ContractError(f"{where}: {key}.{name} must be a finite number, got {value!r}")
        if not 0.0 <= value <= 1.0:  # every metric here is a mean of per-user values in [0, 1]
            raise ContractError(f"{where}: {key}.{name} = {value} is outside [0, 1]")


def validate_metrics(doc: Any, run: bool = True, where: str = "metrics.json") -> None:
    """Raise ContractError naming the first violation; ``run=True`` also requires best_val."""
    if not isinstance(doc, Mapping):
        raise ContractError(f"{where}: top level must be an object")
    if doc.get("model") not in MODEL_NAMES:
        raise ContractError(f"{where}: model {doc.get('model')!r} is not one of {list(MODEL_NAMES)}")
    if not isinstance(doc.get("domain"), str) or not doc["domain"]:
        raise ContractError(f"{where}: domain must be a non-empty string")
    expected_split = ("test",) if run else ("val", "test")
    if doc.get("split") not in expected_split:
        raise ContractError(f"{where}: split must be one of {list(expected_split)}, got {doc.get('split')!r}")
    for key in ("num_users", "num_items"):
        value = doc.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ContractError(f"{where}: {key} must be a positive integer, got {value!r}")
    if doc.get("ties") != "optimistic":
        raise ContractError(f"{where}: ties must be 'optimistic', got {doc.get('ties')!r}")
    _check_metric_block(doc, "metrics", where)
    _check_metric_block(doc, "metrics_pessimistic", where)
    for name, value in doc["metrics"].items():
        worse = doc["metrics_pessimistic"].get(name)
        if worse is not None and worse > value + 1e-9:
            raise ContractError(f"{where}: metrics_pessimistic.{name} ({worse}) exceeds metrics.{name} ({value})")
    if run:
        _check_metric_block(doc, "best_val", where)
    if "by_item_frequency" in doc:  # absent in documents written before it existed
        _check_buckets(doc, where)


def _check_buckets(doc: Mapping[str, Any], where: str) -> None:
    buckets = doc["by_item_frequency"]
    if not isinstance(buckets, list) or not buckets:
        raise ContractError(f"{where}: by_item_frequency must be a non-empty list of buckets")
    total = 0
    for i, bucket in enumerate(buckets):
        at = f"{where}: by_item_frequency[{i}]"
        if not isinstance(bucket, Mapping) or not isinstance(bucket.get("bucket"), str):
            raise ContractError(f"{at} must be an object with a string 'bucket'")
        users = bucket.get("users")
        if isinstance(users, bool) or not isinstance(users, int) or users < 0:
            raise ContractError(f"{at}.users must be a non-negative integer, got {users!r}")
        low, high = bucket.get("min"), bucket.get("max")
        if not isinstance(low, int) or not (high is None or (isinstance(high, int) and high >= low)):
            raise ContractError(f"{at}: min must be an integer and max an integer >= min or null")
        total += users
        if users == 0:
            continue
        _check_metric_block(bucket, "metrics", at)
        if "metrics_pessimistic" in bucket:
            _check_metric_block(bucket, "metrics_pessimistic", at)
    if total != doc["num_users"]:
        raise ContractError(f"{where}: by_item_frequency counts {total} users but num_users is {doc['num_users']}")


def write_metrics(path: str | Path, doc: Mapping[str, Any], run: bool = True) -> Path:
    """Validate then write atomically."""
    path = Path(path)
    validate_metrics(doc, run=run, where=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dict(doc), indent=2)
    return path


def read_metrics(path: str | Path, run: bool = True) -> dict[str, Any]:
    """Read and validate a metrics document."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    doc = read_json(path, ContractError)
    validate_metrics(doc, run=run, where=str(path))
    return doc
