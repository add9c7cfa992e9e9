"""Full ranking of every item of a domain, blocked over users and items.

Nothing of size ``num_users x num_items`` is ever materialised.  :func:`rank_targets`
(and :func:`evaluate_vectors`, which calls it per user chunk) scores a block of users
against a block of items into one reused buffer, counts in that block, and moves on.  On
CPU the block is sized to stay in a core's L2 cache (:data:`CPU_BLOCK_BYTES`) and counted by
one compiled pass (:mod:`reolm.eval.rank_kernel`) that reads each score once, right after the
matrix product wrote it; on CUDA (or without numba) the block is counted with torch operations,
and is ``item_chunk`` items wide there (one kernel launch per block matters more than cache),
with as many users as fit in :data:`DEVICE_BLOCK_BYTES`.
Memory is ``O(block)`` plus the item vectors themselves, whatever the catalogue size
(10M items is fine).

Two ranks are computed for each user's target item:

* optimistic  = number of *other* items scoring strictly higher than the target
  (the reference implementation's convention: ties favour the target);
* pessimistic = number of *other* items scoring higher **or equal** (ties count against).

The target's own column is excluded from the comparison instead of being compared with
itself, so the result does not depend on the target score being bit-identical between
the gathered target score and the blocked matrix product (they come from different
kernels).  Items whose score is NaN never count as ranked above the target.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from reolm.eval.metrics import DEFAULT_KS, MetricAccumulator
from reolm.eval.rank_kernel import CompiledCounter
from reolm.model.objectives import (Similarity, check_similarity, paired_scores, prepare_vectors, product_scores,
                                    score_dtype)

__all__ = ["Similarity", "rank_targets", "rank_with_score_fn", "evaluate_vectors",
           "ChunkScoreFn", "TargetScoreFn", "CPU_BLOCK_BYTES", "CPU_USER_BLOCK", "DEVICE_BLOCK_BYTES"]

#: scores of the current user batch against items [start, end): returns [B, end - start]
ChunkScoreFn = Callable[[int, int], torch.Tensor]
#: scores of the current user batch against one item per user: targets [B] -> [B]
TargetScoreFn = Callable[[torch.Tensor], torch.Tensor]

#: fp32 scores one CPU block holds: about half of a core's L2, so the product's output is
#: still cached when the counting pass reads it.
CPU_BLOCK_BYTES = 1 << 20
#: users per CPU block; more users per block would shrink its item width below what the
#: matrix product runs efficiently at.
CPU_USER_BLOCK = 256
#: bytes of one block's scores on an accelerator (the torch counting adds two 0/1 blocks of the
#: same size).  Validation ranks all its users in one call: uncapped, 100k users x 65k items
#: would ask for ~78 GB at once.
DEVICE_BLOCK_BYTES = 512 << 20


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


class _RankCounter:
    """Per-user counts of items scoring ``>`` and ``>=`` the target, block after block.

    On CPU the counts come from :mod:`reolm.eval.rank_kernel`, one compiled pass that reads each
    score once. Elsewhere (CUDA, or without numba) both comparisons of a block are written as 0/1
    floats into one reused ``[2, B, n]`` buffer and summed by one matrix-vector product: on CPU
    that is several times faster than bool masks summed by ``sum`` (which also widens to int64).
    Per-block sums are exact integers in fp32 (n < 2**24). The target's own column is taken back
    at the end: ``own`` keeps the score at that column, gathered from the block holding it
    (every block starts at a multiple of ``block``, so the column is the same in each).
    """

    def __init__(self, target_scores: torch.Tensor, targets: torch.Tensor, block: int):
        device = target_scores.device
        target_scores = target_scores.contiguous()
        self.target_scores, self.t = target_scores, target_scores.unsqueeze(1)
        targets = targets.to(device)
        rows = targets.shape[0]
        self.block = block
        self.targets = targets.long().contiguous()
        self.target_block = torch.div(targets, block, rounding_mode="floor")
        self.target_column = (targets - self.target_block * block).unsqueeze(1)
        self.above = torch.zeros(rows, dtype=torch.int64, device=device)
        self.at_or_above = torch.zeros(rows, dtype=torch.int64, device=device)
        self.own = torch.full_like(target_scores, float("nan"))  # NaN: never counted, never taken back
        self._dtype = torch.promote_types(target_scores.dtype, torch.float32)
        self._flags: torch.Tensor | None = None  # allocated on the first block the kernel cannot count
        self._compiled = CompiledCounter.bind(self.target_scores, self.above, self.at_or_above, self.targets, self.own)

    def _count_with_torch(self, scores: torch.Tensor) -> None:
        rows, n = scores.shape
        if self._flags is None:
            self._flags = torch.empty(2 * rows * self.block, dtype=self._dtype, device=scores.device)
            self._ones = torch.ones(self.block, dtype=self._dtype, device=scores.device)
        flags = self._flags[:2 * rows * n].view(2, rows, n)
        torch.gt(scores, self.t, out=flags[0])
        torch.ge(scores, self.t, out=flags[1])
        above, at_or_above = (flags.view(2 * rows, n) @ self._ones[:n]).view(2, rows).long()
        self.above += above
        self.at_or_above += at_or_above

    def add(self, scores: torch.Tensor, start: int) -> None:
        """Count one block: ``scores`` [B, n] against items [start, start + n); ``start`` is a
        multiple of ``block`` and ``n <= block``."""
        n = scores.shape[1]
        if self._compiled is not None and self._compiled.count(scores, start):
            return  # the kernel also picked up the target's own score
        self._count_with_torch(scores)
        own = scores.gather(1, self.target_column.clamp(max=n - 1)).squeeze(1)
        # in place: the compiled counter holds a view of ``own``
        self.own.copy_(torch.where(self.target_block == start // self.block, own, self.own))

    def ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(optimistic, pessimistic) int64 ranks, the target's own column excluded."""
        return (self.above - (self.own > self.target_scores).long(),
                self.at_or_above - (self.own >= self.target_scores).long())


def rank_with_score_fn(score_chunk: ChunkScoreFn, score_targets: TargetScoreFn, targets: torch.Tensor,
                       num_items: int, item_chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """(optimistic, pessimistic) ranks [B] of ``targets`` for one user batch.

    ``score_chunk(start, end)`` scores the batch against items [start, end);
    ``score_targets(targets)`` scores each user against its own target item.
    """
    if item_chunk < 1:
        raise ValueError(f"item_chunk must be >= 1, got {item_chunk}")
    counter = _RankCounter(score_targets(targets), targets, max(1, min(item_chunk, num_items)))
    for start, end in _chunks(num_items, item_chunk):
        scores = score_chunk(start, end)
        if scores.shape != (targets.shape[0], end - start):
            raise ValueError(f"score function returned shape {tuple(scores.shape)} for items "
                             f"[{start}, {end}) and {targets.shape[0]} users")
        counter.add(scores, start)
    return counter.ranks()


def _block_shape(num_users: int, item_chunk: int, device: torch.device, itemsize: int = 4) -> tuple[int, int]:
    """(users, items) per block: cache-sized on CPU; elsewhere ``item_chunk`` wide and as many users
    as keep the block's scores (``itemsize`` bytes each) within :data:`DEVICE_BLOCK_BYTES`."""
    if device.type != "cpu":
        return max(1, min(num_users, DEVICE_BLOCK_BYTES // (itemsize * item_chunk))), item_chunk
    users = max(1, min(num_users, CPU_USER_BLOCK))
    return users, max(1, min(item_chunk, CPU_BLOCK_BYTES // (4 * users)))


def _score_blocks(buffer: torch.Tensor, rows: int, num_items: int, width: int
                  ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, end, out) per item block: ``out`` is a [rows, end - start] view of ``buffer``, the
    same view object for every full-width block (only a shorter last block gets its own)."""
    full = buffer[:rows * width].view(rows, width)
    for start, end in _chunks(num_items, width):
        yield start, end, full if end - start == width else buffer[:rows * (end - start)].view(rows, end - start)


def _rank_block_rows(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, target_scores: torch.Tensor,
                     temperature: float, item_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of one user block against every item, one reused [B, item_block] score buffer."""
    num_items = items.shape[0]
    width = min(item_block, num_items)
    buffer = torch.empty(users.shape[0] * width, dtype=torch.promote_types(users.dtype, items.dtype),
                         device=users.device)
    counter = _RankCounter(target_scores, targets, width)
    for start, end, out in _score_blocks(buffer, users.shape[0], num_items, width):
        counter.add(product_scores(users, items[start:end], temperature, out=out), start)
    return counter.ranks()


def rank_targets(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, *,
                 similarity: Similarity = "dot", temperature: float = 1.0,
                 item_chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """(optimistic, pessimistic) ranks of ``targets`` [B] for user vectors [B, H] vs items [N, H].

    The scores are those of :func:`reolm.model.objectives.similarity_scores` (vectors prepared
    once: fp32 or wider, normalised row by row for cosine; then the product and the division by
    ``temperature``), computed block by block.
    """
    if item_chunk < 1:
        raise ValueError(f"item_chunk must be >= 1, got {item_chunk}")
    check_similarity(similarity)
    items = items.to(users.device)
    targets = targets.to(users.device)
    target_scores = paired_scores(users, items[targets], similarity, temperature)
    dtype = score_dtype(users, items)
    users, items = prepare_vectors(users, similarity, dtype), prepare_vectors(items, similarity, dtype)
    user_block, item_block = _block_shape(users.shape[0], item_chunk, users.device, users.element_size())
    parts = [_rank_block_rows(users[lo:hi], items, targets[lo:hi], target_scores[lo:hi], temperature, item_block)
             for lo, hi in _chunks(users.shape[0], user_block)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.no_grad()
def evaluate_vectors(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, *,
                     similarity: Similarity = "dot", temperature: float = 1.0,
                     user_chunk: int = 1024, item_chunk: int = 65536, device: str | torch.device | None = None,
                     ks: tuple[int, ...] = DEFAULT_KS,
                     accumulator: MetricAccumulator | None = None) -> MetricAccumulator:
    """Rank every user's target among all items; returns the (updated) accumulator.

    ``users`` [U, H] and ``targets`` [U] may live on the CPU: they are moved to ``device``
    ``user_chunk`` rows at a time.  ``items`` [N, H] is moved to ``device`` once.
    """
    if users.shape[0] != targets.shape[0]:
        raise ValueError(f"{users.shape[0]} user vectors but {targets.shape[0]} targets")
    if users.shape[1] != items.shape[1]:
        raise ValueError(f"user vectors have dim {users.shape[1]} but item vectors {items.shape[1]}")
    device = torch.device(device) if device is not None else items.device
    items = items.to(device)
    acc = accumulator or MetricAccumulator(items.shape[0], ks)
    for start, end in _chunks(users.shape[0], user_chunk):
        u = users[start:end].to(device, non_blocking=True)
        opt, pess = rank_targets(u, items, targets[start:end].to(device), similarity=similarity,
                                 temperature=temperature, item_chunk=item_chunk)
        acc.add(opt, pess)
    return acc
