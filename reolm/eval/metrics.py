"""Ranking metrics for leave-one-out evaluation, accumulated as sums over users.

A user's *rank* is the number of items placed before the held-out target, so rank 0
means the target is first.  Every metric is a per-user value averaged over users:

* ``NDCG@K``   = 1 / log2(rank + 2) when rank < K, else 0 (one relevant item, IDCG = 1)
* ``Recall@K`` = 1 when rank < K, else 0 (equal to HR@K with one target)
* ``MRR``      = 1 / (rank + 1)  (full list, no cut-off; the reference's convention)
* ``AUC``      = 1 - rank / (num_items - 1)  (fraction of other items ranked below the target)

Batches are combined by summing per-user values and dividing by the total user count
once at the end, so unequal batch sizes are weighted correctly.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

__all__ = ["DEFAULT_KS", "metric_names", "metric_values", "metric_sums", "MetricAccumulator",
           "GroupedMetricAccumulator"]

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Names in report order: NDCG@K..., Recall@K..., MRR, AUC."""
    return [f"NDCG@{k}" for k in ks] + [f"Recall@{k}" for k in ks] + ["MRR", "AUC"]


def metric_values(ranks: torch.Tensor, num_items: int, ks: Sequence[int] = DEFAULT_KS) -> dict[str, torch.Tensor]:
    """Per-user metric values [B] (float64) of a batch of 0-based ranks, in report order."""
    if num_items < 2:
        raise ValueError(f"ranking needs at least 2 items, got num_items={num_items}")
    r = ranks.to(torch.float64)
    gain = 1.0 / torch.log2(r + 2.0)
    values: dict[str, torch.Tensor] = {}
    for k in ks:
        values[f"NDCG@{k}"] = torch.where(r < k, gain, torch.zeros_like(gain))
    for k in ks:
        values[f"Recall@{k}"] = (r < k).to(torch.float64)
    values["MRR"] = 1.0 / (r + 1.0)
    values["AUC"] = 1.0 - r / (num_items - 1)
    return values


def metric_sums(ranks: torch.Tensor, num_items: int, ks: Sequence[int] = DEFAULT_KS) -> dict[str, torch.Tensor]:
    """Per-metric sums over a batch of 0-based ranks (a float64 0-d tensor each, no host sync)."""
    return {name: value.sum() for name, value in metric_values(ranks, num_items, ks).items()}


class MetricAccumulator:
    """Sums metric values of optimistic and pessimistic ranks over batches of users.

    ``add(optimistic, pessimistic)`` takes the two rank tensors of one batch; ``result()``
    returns ``(metrics, metrics_pessimistic)`` as plain floats averaged over all users added.
    """

    def __init__(self, num_items: int, ks: Iterable[int] = DEFAULT_KS) -> None:
        self.num_items = int(num_items)
        self.ks = tuple(int(k) for k in ks)
        self.count = 0
        self._sums: dict[str, dict[str, torch.Tensor]] = {"optimistic": {}, "pessimistic": {}}

    def _add(self, which: str, ranks: torch.Tensor) -> None:
        bucket = self._sums[which]
        # Sums stay on the ranks' device (no host sync per batch); result() reads them once.
        for name, value in metric_sums(ranks, self.num_items, self.ks).items():
            bucket[name] = bucket[name] + value.to(bucket[name].device) if name in bucket else value

    def add(self, optimistic: torch.Tensor, pessimistic: torch.Tensor | None = None) -> None:
        """Add one batch; ``pessimistic`` defaults to ``optimistic`` (no ties)."""
        if optimistic.ndim != 1:
            raise ValueError(f"ranks must be 1-d, got shape {tuple(optimistic.shape)}")
        self._add("optimistic", optimistic)
        self._add("pessimistic", optimistic if pessimistic is None else pessimistic)
        self.count += int(optimistic.shape[0])

    def merge(self, other: "MetricAccumulator") -> None:
        """Fold another accumulator (same num_items and ks) into this one."""
        if (other.num_items, other.ks) != (self.num_items, self.ks):
            raise ValueError("cannot merge accumulators with different num_items or cut-offs")
        for which in self._sums:
            for name, value in other._sums[which].items():
                mine = self._sums[which]
                mine[name] = mine[name] + value.to(mine[name].device) if name in mine else value
        self.count += other.count

    def _means(self, which: str) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no users were evaluated (empty split?)")
        sums = self._sums[which]
        return {name: float(sums[name].cpu()) / self.count for name in metric_names(self.ks)}

    def result(self) -> tuple[dict[str, float], dict[str, float]]:
        """(optimistic metrics, pessimistic metrics), each averaged over all users."""
        return self._means("optimistic"), self._means("pessimistic")


class GroupedMetricAccumulator:
    """Metric sums per group of users (e.g. by how often the target item was trained on).

    ``add(optimistic, pessimistic, groups)`` takes the rank tensors of one batch and each
    user's group index in ``[0, num_groups)``; sums are scattered into per-group tensors
    (``index_add_``, no host sync).  ``result()`` returns ``(count, metrics, pessimistic)``
    per group, the metrics ``None`` for an empty group.
    """

    def __init__(self, num_items: int, num_groups: int, ks: Iterable[int] = DEFAULT_KS) -> None:
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.num_items = int(num_items)
        self.num_groups = int(num_groups)
        self.ks = tuple(int(k) for k in ks)
        self._counts: torch.Tensor | None = None
        self._sums: dict[str, dict[str, torch.Tensor]] = {"optimistic": {}, "pessimistic": {}}

    def _add(self, which: str, ranks: torch.Tensor, groups: torch.Tensor) -> None:
        bucket = self._sums[which]
        for name, value in metric_values(ranks, self.num_items, self.ks).items():
            if name not in bucket:
                bucket[name] = torch.zeros(self.num_groups, dtype=torch.float64, device=value.device)
            bucket[name].index_add_(0, groups.to(value.device), value)

    def add(self, optimistic: torch.Tensor, pessimistic: torch.Tensor, groups: torch.Tensor) -> None:
        if optimistic.shape != groups.shape or optimistic.ndim != 1:
            raise ValueError(f"ranks {tuple(optimistic.shape)} and groups {tuple(groups.shape)} must be equal 1-d")
        groups = groups.to(optimistic.device, torch.long)
        self._add("optimistic", optimistic, groups)
        self._add("pessimistic", pessimistic, groups)
        counts = torch.bincount(groups, minlength=self.num_groups)
        self._counts = counts if self._counts is None else self._counts + counts

    def result(self) -> list[tuple[int, dict[str, float] | None, dict[str, float] | None]]:
        counts = [0] * self.num_groups if self._counts is None else self._counts.cpu().tolist()
        sums = {which: {name: value.cpu().tolist() for name, value in block.items()}
                for which, block in self._sums.items()}
        out: list[tuple[int, dict[str, float] | None, dict[str, float] | None]] = []
        for g, count in enumerate(counts):
            if count == 0:
                out.append((0, None, None))
                continue
            means = [{name: sums[which][name][g] / count for name in metric_names(self.ks)}
                     for which in ("optimistic", "pessimistic")]
            out.append((int(count), means[0], means[1]))
        return out
