"""Leave-one-out evaluation of any sequential recommender on a processed domain.

* validation: input = the user's train sequence,            target = the val item;
* test:       input = the train sequence + the val item,    target = the test item.

Only the last ``max_history`` items of the input are given to the model.  The target is
ranked against **all** items of the domain; items already in the history are not
filtered (the reference's protocol).

A model plugs in by implementing :class:`Recommender`: binding to the domain it scores, item
vectors [N, H] for the whole catalogue, user vectors [B, H] for a batch of histories, and how the
two are compared (dot product, or cosine divided by a temperature).  Reo-LM and every baseline are
evaluated by this same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from reolm.data.domain import Domain
from reolm.eval.frequency import DEFAULT_FREQUENCY_BUCKETS, FrequencyBuckets, bucket_documents, item_train_counts
from reolm.eval.metrics import DEFAULT_KS, GroupedMetricAccumulator, MetricAccumulator
from reolm.eval.ranking import Similarity, rank_targets

__all__ = ["Recommender", "SplitExamples", "split_examples", "sample_users", "EvalResult", "evaluate_recommender"]

Split = Literal["val", "test"]


@runtime_checkable
class Recommender(Protocol):
    """What evaluation needs from a model (baselines and Reo-LM alike)."""

    #: "dot" or "cosine"; scores are ``sim(user, item) / temperature``
    similarity: Similarity
    temperature: float
    #: number of most recent history items the model sees when none is configured
    default_max_history: int

    def bind(self, domain: Domain) -> "Recommender":
        """Items are now ``domain``'s (returns self): a content model reads their text and images
        from it; an ID model, whose items are rows of its own tables, does nothing."""

    def item_vectors(self) -> torch.Tensor:
        """[num_items, H] vectors of every item of the domain, row = item index."""

    def user_vectors(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """[B, H] vectors for B histories (item indices in time order, already cut)."""


@dataclass
class SplitExamples:
    users: list[int]
    histories: list[list[int]]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.users)


def split_examples(domain: Domain, split: Split) -> SplitExamples:
    """The (user, full history, target) triples of ``split`` in user order."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    held_out = domain.val if split == "val" else domain.test
    users, histories, targets = [], [], []
    for user in sorted(held_out):
        history = list(domain.train.get(user, []))
        if split == "test":
            history += list(domain.val.get(user, []))
        if not history:
            continue  # nothing to condition on; Domain.validate() forbids this anyway
        users.append(user)
        histories.append(history)
        targets.append(held_out[user][0])
    return SplitExamples(users, histories, targets)


def sample_users(examples: SplitExamples, max_users: int, seed: int) -> SplitExamples:
    """A random subset of ``max_users`` examples, the same for every model of a domain and seed
    (drawn from the split's users in user order, kept in that order); all when there are fewer."""
    if max_users <= 0 or max_users >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=max_users, replace=False))
    return SplitExamples([examples.users[i] for i in keep], [examples.histories[i] for i in keep],
                         [examples.targets[i] for i in keep])


@dataclass
class EvalResult:
    split: str
    num_users: int
    num_items: int
    metrics: dict[str, float]
    metrics_pessimistic: dict[str, float]
    #: the same metrics per bucket of the target item's training frequency (reolm.eval.frequency)
    by_item_frequency: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "num_users": self.num_users, "num_items": self.num_items,
                "ties": "optimistic", "metrics": self.metrics, "metrics_pessimistic": self.metrics_pessimistic,
                "by_item_frequency": self.by_item_frequency}


@torch.no_grad()
def evaluate_recommender(model: Recommender, domain: Domain, split: Split = "val", *,
                         max_history: int | None = None, batch_size: int = 256, item_chunk: int = 65536,
                         ks: Sequence[int] = DEFAULT_KS, frequency_buckets: Sequence[int] = DEFAULT_FREQUENCY_BUCKETS,
                         progress: bool = True, max_users: int = 0, seed: int = 0) -> EvalResult:
    """Full-ranking metrics of ``model`` on ``split`` of ``domain`` (averaged over users), overall
    and per bucket of how often each target occurs in training (lower bounds ``frequency_buckets``).

    ``max_users > 0`` evaluates a reproducible random subset of that many users
    (:func:`sample_users`); the result's ``extra["user_subset"]`` then records it.
    """
    examples = split_examples(domain, split)
    all_users = len(examples)
    examples = sample_users(examples, max_users, seed)
    buckets = FrequencyBuckets(tuple(frequency_buckets))
    item_bucket = buckets.assign(item_train_counts(domain))
    keep = max_history or model.default_max_history
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        items = model.item_vectors()
        if items.shape[0] != domain.num_items:
            raise ValueError(f"model scores {items.shape[0]} items but domain {domain.name!r} has "
                             f"{domain.num_items}")
        acc = MetricAccumulator(domain.num_items, ks)
        by_bucket = GroupedMetricAccumulator(domain.num_items, len(buckets), ks)
        target_bucket = item_bucket.to(items.device)
        starts = range(0, len(examples), batch_size)
        for start in tqdm(starts, desc=f"eval {split}", unit="batch", disable=not progress, leave=False):
            histories = [h[-keep:] for h in examples.histories[start:start + batch_size]]
            users = model.user_vectors(histories)
            targets = torch.as_tensor(examples.targets[start:start + batch_size], device=users.device)
            opt, pess = rank_targets(users, items, targets, similarity=model.similarity,
                                     temperature=model.temperature, item_chunk=item_chunk)
            acc.add(opt, pess)
            by_bucket.add(opt, pess, target_bucket[targets.to(target_bucket.device)])
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    metrics, pessimistic = acc.result()
    extra = {}
    if len(examples) < all_users:
        extra["user_subset"] = {"max_users": int(max_users), "seed": int(seed), "of_users": all_users}
    return EvalResult(split, acc.count, domain.num_items, metrics, pessimistic,
                      by_item_frequency=bucket_documents(buckets, by_bucket), extra=extra)
