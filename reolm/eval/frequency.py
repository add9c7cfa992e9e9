"""Evaluation broken down by how often the target item occurs in the training sequences.

A content model should win where an ID model cannot: on items it was never (or rarely)
trained on.  Each evaluated user falls into the bucket of its target item's number of
occurrences in ``train.json`` (all users' training sequences); the default buckets are
``0`` (cold: never trained on), ``1-4``, ``5-19`` and ``20+``.  Buckets are given by their
lower bounds, the first of which must be 0 so that every user falls into one.

The per-bucket metrics come from the very ranks the overall metrics are computed from
(:func:`reolm.eval.evaluate.evaluate_recommender`), so their user-weighted mean is the
overall value.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reolm.data.domain import Domain
from reolm.eval.metrics import GroupedMetricAccumulator

__all__ = ["DEFAULT_FREQUENCY_BUCKETS", "FrequencyBuckets", "item_train_counts", "bucket_documents"]

#: lower bounds of the buckets "0", "1-4", "5-19", "20+"
DEFAULT_FREQUENCY_BUCKETS: tuple[int, ...] = (0, 1, 5, 20)


@dataclass(frozen=True)
class FrequencyBuckets:
    """Buckets of training-occurrence counts, given by their increasing lower bounds."""

    lower: tuple[int, ...] = DEFAULT_FREQUENCY_BUCKETS

    def __post_init__(self) -> None:
        lower = tuple(int(b) for b in self.lower)
        if not lower or lower[0] != 0:
            raise ValueError(f"frequency buckets must start at 0 (every user needs a bucket), got {list(lower)}")
        if any(b >= c for b, c in zip(lower, lower[1:])):
            raise ValueError(f"frequency bucket bounds must increase strictly, got {list(lower)}")
        object.__setattr__(self, "lower", lower)

    def __len__(self) -> int:
        return len(self.lower)

    def bounds(self, index: int) -> tuple[int, int | None]:
        """(min, max) occurrences of bucket ``index``; max is None for the last, open bucket."""
        upper = self.lower[index + 1] - 1 if index + 1 < len(self.lower) else None
        return self.lower[index], upper

    def label(self, index: int) -> str:
        low, high = self.bounds(index)
        if high is None:
            return f"{low}+"
        return str(low) if low == high else f"{low}-{high}"

    def assign(self, counts: torch.Tensor) -> torch.Tensor:
        """Bucket index of each count (same shape, int64)."""
        inner = torch.as_tensor(self.lower[1:], dtype=counts.dtype, device=counts.device)
        return torch.bucketize(counts, inner, right=True)


def item_train_counts(domain: Domain) -> torch.Tensor:
    """[num_items] int64: occurrences of every item in the domain's training sequences."""
    flat = np.fromiter(itertools.chain.from_iterable(domain.train.values()), dtype=np.int64)
    return torch.from_numpy(np.bincount(flat, minlength=domain.num_items)[:domain.num_items].astype(np.int64))


def bucket_documents(buckets: FrequencyBuckets, acc: GroupedMetricAccumulator) -> list[dict[str, Any]]:
    """The ``by_item_frequency`` list of a metrics document (metrics null for an empty bucket)."""
    docs = []
    for index, (users, metrics, pessimistic) in enumerate(acc.result()):
        low, high = buckets.bounds(index)
        docs.append({"bucket": buckets.label(index), "min": low, "max": high, "users": users,
                     "metrics": metrics, "metrics_pessimistic": pessimistic})
    return docs

