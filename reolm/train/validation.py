"""Validation during pre-training: next-item retrieval of dev targets among a candidate pool, MLM accuracy.

The dev set (:func:`validation_set`) is read once: the first ``val.max_users`` good dev
samples and a fixed pool of candidates holding every target.  :func:`validate` encodes
histories and candidates with the current weights, split over the ranks, and ranks each
target with :mod:`reolm.eval`'s ranking and metrics (ties rank optimistically: only items
scoring strictly higher count), the same code that evaluates fine-tuned models.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from reolm.config import ConfigError
from reolm.data.batch import PackedBatch
from reolm.data.collate import SequenceExample
from reolm.eval.metrics import MetricAccumulator
from reolm.eval.ranking import rank_targets
from reolm.model.objectives import mlm_predictions
from reolm.train import distributed as D
from reolm.train.data import BadSampleCounter, DataError, list_shards, read_examples
from reolm.train.setup import TrainSetup

__all__ = ["ValidationSet", "validation_set", "validate", "ranking_metrics"]

log = logging.getLogger("reolm.train")
MLM_SEED = 99  # with cfg.seed: the same masks at every validation, so MLM accuracy is comparable


class ValidationSet(NamedTuple):
    examples: list[SequenceExample]
    pool: np.ndarray          # candidate item indices (sorted), every target among them
    skipped: dict[str, int]   # val_skipped_samples[_KIND]: bad dev data, reported with each validation


def validation_set(setup: TrainSetup) -> ValidationSet | None:
    """The dev examples and candidate pool of this run; None (warned) when there is nothing to validate on."""
    cfg, corpus, num_items = setup.cfg, setup.inputs.corpus, setup.inputs.num_items
    if cfg.val.every == 0:
        return None
    try:
        shards = list_shards(cfg.data, "dev", corpus)
    except (ConfigError, DataError) as err:
        log.warning("no validation: %s", err)
        return None
    # Missing/unreadable dev shards and bad samples are skipped and counted, as in training.
    counter = BadSampleCounter(max_logs=5, where=" [dev]")
    expected = corpus.shard_counts() if corpus is not None and not cfg.data.dev_shards else None
    examples = read_examples(shards, num_items, cfg.val.max_users, counter, expected)
    skipped = {"val_skipped_samples": counter.total,
               **{f"val_skipped_samples_{kind}": n for kind, n in counter.counts.items()}}
    if counter.total:
        log.warning("validation set: %d bad dev sample(s) skipped %s", counter.total, counter.counts)
    if not examples:
        log.warning("no validation: no readable dev samples in %d shard(s)", len(shards))
        return None
    return ValidationSet(examples, _candidate_pool(examples, cfg.val.num_candidates, num_items, cfg.seed),
                         skipped)


def _candidate_pool(examples: Sequence[SequenceExample], size: int, num_items: int, seed: int) -> np.ndarray:
    """Every target plus random other items up to ``size`` (fixed by the seed), sorted."""
    targets = np.unique([e.target for e in examples])
    size = min(max(size, len(targets)), num_items)
    rng = np.random.default_rng(seed + 17)
    others = np.setdiff1d(np.arange(num_items), targets)
    extra = rng.choice(others, size=size - len(targets), replace=False) if size > len(targets) else []
    return np.sort(np.concatenate([targets, np.asarray(extra, dtype=np.int64)]))


# ----------------------------------------------------------------------------- encoding

def _sharded_encode(items: list[Any], batch_size: int, encode: Callable[[list[Any]], torch.Tensor]) -> torch.Tensor:
    """Encode ``items`` split over ranks in equal-size chunks (every rank runs the same number of
    forward passes, which ZeRO-3 requires), then all-gather the vectors in the original order."""
    info = D.info()
    per_rank = math.ceil(len(items) / info.world_size / batch_size) * batch_size
    padded = items + [items[0]] * (per_rank * info.world_size - len(items))
    mine = padded[info.rank * per_rank:(info.rank + 1) * per_rank]
    vecs = torch.cat([encode(mine[i:i + batch_size]) for i in range(0, per_rank, batch_size)])
    return D.all_gather_no_grad(vecs.float().contiguous())[:len(items)]


@contextlib.contextmanager
def _masking(collator: Any, probability: float, seed: Any = None) -> Iterator[None]:
    """Collate with MLM masking at ``probability`` inside the block (fixed masks given a ``seed``).

    Training batches reseed the collator themselves, so its generator needs no restoring.
    """
    saved = collator.mlm_probability
    collator.mlm_probability = probability
    if seed is not None:
        collator.reseed(seed)
    try:
        yield
    finally:
        collator.mlm_probability = saved


class _Encoder:
    """Forward passes of the run's module over dev histories and candidate items (no gradient)."""

    def __init__(self, setup: TrainSetup) -> None:
        self.module, self.collator = setup.engine.module, setup.inputs.collator
        self.device = setup.rank.device
        self.mlm_stats = torch.zeros(2, device=self.device)  # (correct predictions, masked tokens)

    def _histories(self, chunk: list[SequenceExample]) -> PackedBatch:
        """The chunk's histories (without their targets) as a batch on the device."""
        examples = [SequenceExample(e.history, None, e.domain) for e in chunk]
        return self.collator(examples).history.to(self.device)

    def items(self, chunk: list[tuple[int, int]]) -> torch.Tensor:
        """Vectors of (item, domain) pairs: each item through the adapter of the domain it is ranked in."""
        batch = self.collator.collate_items([i for i, _ in chunk], [d for _, d in chunk])
        return self.module(batch.to(self.device)).pooled

    def histories(self, chunk: list[SequenceExample]) -> torch.Tensor:
        return self.module(self._histories(chunk)).pooled

    def count_mlm_hits(self, chunk: list[SequenceExample]) -> torch.Tensor:
        """Add the chunk's correct MLM predictions to ``mlm_stats``; returns a stub vector per example."""
        batch = self._histories(chunk)
        out = self.module(batch)
        if batch.mlm_positions.shape[0]:
            logits, labels = mlm_predictions(self.module, out, batch)
            hits = (logits.argmax(-1) == labels).sum().float()
            self.mlm_stats.add_(torch.stack([hits, hits.new_tensor(float(labels.shape[0]))]))
        return out.pooled[:, :1]

    def mlm_accuracy(self) -> float:
        D.all_reduce_sum(self.mlm_stats)
        correct, total = self.mlm_stats.tolist()
        return correct / total if total else float("nan")


@torch.no_grad()
def validate(setup: TrainSetup, examples: list[SequenceExample], pool: np.ndarray,
             skipped: dict[str, int] | None = None) -> dict[str, float]:
    """Next-item Recall@k / NDCG@k of dev targets among ``pool`` (which contains every target),
    plus MLM accuracy of the dev histories, and the ``skipped`` counts of bad dev data.

    Retrieval encodes the histories WITHOUT masking (as evaluation does); MLM accuracy comes from
    a second, masked pass with a fixed seed.  Every rank encodes an equal share (ZeRO-3 needs all
    ranks in every forward).
    """
    module, collator, cfg = setup.engine.module, setup.inputs.collator, setup.cfg
    encoder = _Encoder(setup)
    configured_masking = collator.mlm_probability
    was_training = module.training
    module.eval()
    try:
        domains = sorted({e.domain for e in examples})
        pool_items = [(int(i), d) for d in domains for i in pool]
        with _masking(collator, 0.0), setup.rank.autocast():
            item_vecs = _sharded_encode(pool_items, cfg.val.batch_size, encoder.items).view(len(domains), len(pool), -1)
            user_vecs = _sharded_encode(examples, cfg.val.batch_size, encoder.histories)
        with _masking(collator, configured_masking, seed=[cfg.seed, MLM_SEED]), setup.rank.autocast():
            _sharded_encode(examples, cfg.val.batch_size, encoder.count_mlm_hits)
        mlm_accuracy = encoder.mlm_accuracy()
    finally:
        if was_training:
            module.train()
    return ranking_metrics(module, examples, pool, domains, user_vecs, item_vecs, cfg.val.k) | {
        "val_mlm_accuracy": mlm_accuracy, **(skipped or {})}


def ranking_metrics(module: Any, examples: list[SequenceExample], pool: np.ndarray, domains: list[int],
                    user_vecs: torch.Tensor, item_vecs: torch.Tensor, k: int) -> dict[str, float]:
    """Recall@k and NDCG@k of each example's target among the pool, scored against its domain's item vectors."""
    position = {int(item): j for j, item in enumerate(pool)}
    acc = MetricAccumulator(len(pool), ks=(k,))
    for d_index, domain in enumerate(domains):
        rows = [i for i, e in enumerate(examples) if e.domain == domain]
        targets = torch.tensor([position[examples[i].target] for i in rows])
        optimistic, _ = rank_targets(user_vecs[rows], item_vecs[d_index], targets, similarity="cosine",
                                     temperature=float(module.config.temperature))
        acc.add(optimistic)
    metrics, _ = acc.result()
    return {f"val_recall@{k}": metrics[f"Recall@{k}"], f"val_ndcg@{k}": metrics[f"NDCG@{k}"],
            "val_users": len(examples), "val_pool": len(pool), f"val_random_recall@{k}": min(k / len(pool), 1.0)}
