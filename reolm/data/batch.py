"""Typed model batches: what :class:`~reolm.data.collate.PackedCollator` builds and the model reads.

:class:`PackedBatch` is one packed (or padded) token stream of sequences with every piece of
metadata the forward needs, built as CPU tensors (in DataLoader workers) plus Python ints, so the
forward never syncs with the host.  :class:`TrainingBatch` pairs the histories with their targets
(``PackedCollator.__call__``), plus what the pre-training stream attaches (the samples' keys and
the reading position of the worker that built it, :class:`StreamInfo`).

Both move with ``.to(device, non_blocking=True)`` and pin with ``.pin_memory()`` (which the
DataLoader's ``pin_memory=True`` calls), each returning a new batch: tensors are copied, Python
values shared.  :func:`move_batch` does the same for nested lists/dicts of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

__all__ = ["PackedBatch", "TrainingBatch", "StreamInfo", "move_batch", "map_tensors"]


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A copy of the dataclass ``obj`` with ``fn`` applied to every tensor field (other fields shared)."""
    changes = {f.name: fn(value) for f in dataclasses.fields(obj)
               if isinstance(value := getattr(obj, f.name), torch.Tensor)}
    return dataclasses.replace(obj, **changes)


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """Sequences packed into one token stream (no padding) or, with ``layout="padded"``, one
    ``[B, max_seqlen]`` grid; see ``docs/model.md`` ("Batch fields").

    T = tokens (slots) in the stream, B = sequences, M = image tokens, P = masked tokens, d = the
    image feature width.  In a packed stream the sequences are **longest first**, not in example
    order; every per-sequence field (``seq_*``) is in example order, per-token fields in stream
    order, and ``token_seq_index`` / ``seq_cls_index`` map between the two.  Index fields
    (``image_token_index``, ``mlm_positions``) are stream positions.
    """

    input_ids: torch.Tensor
    """int64 [T]: token ids; image slots hold ``pad_token_id`` (their embedding is replaced)."""
    token_type_ids: torch.Tensor
    """int64 [T]: 0 = CLS, 1..K attribute, K+1 image, K+2 padding."""
    position_ids: torch.Tensor
    """int64 [T]: 0-based position within the sequence (the model adds RoBERTa's offset)."""
    item_position_ids: torch.Tensor
    """int64 [T]: j for every token of the j-th item (most recent = 1), 0 for CLS / padding."""
    cu_seqlens: torch.Tensor
    """int32 [B+1]: boundaries of the sequences in the stream; ``cu_seqlens[-1] == num_tokens``."""
    max_seqlen: int
    """The longest sequence (padded layout: slots per sequence)."""
    layout: str
    """``"packed"`` or ``"padded"`` (every sequence owns ``max_seqlen`` slots; eager/sdpa only)."""
    token_seq_index: torch.Tensor
    """int64 [T]: example index of each token."""
    seq_cls_index: torch.Tensor
    """int64 [B]: stream position of each example's ``[CLS]``."""
    seq_lengths: torch.Tensor
    """int64 [B]: real tokens per example."""
    stream_seq_lengths: torch.Tensor
    """int64 [B]: real tokens per sequence in stream order (the order of ``cu_seqlens``)."""
    attn_grid_index: torch.Tensor
    """int64 [T]: slot of each token in its attention group's ``[n, L]`` grid (eager/sdpa)."""
    attn_grid_source: torch.Tensor
    """int64 [S]: for every slot of each attention group that has padding, the group's row that
    fills it (padding slots: row 0); S = the sum of n x L over those groups (eager/sdpa)."""
    attn_groups: list[tuple[int, int, int]]
    """Per attention length group of the stream: (tokens, sequences n, longest L) (eager/sdpa)."""
    seq_domains: torch.Tensor
    """int64 [B]: domain index of each sequence (adapter routing)."""
    seq_num_items: torch.Tensor
    """int64 [B]: history items kept per sequence."""
    image_token_index: torch.Tensor
    """int64 [M]: stream positions of the image tokens."""
    image_item_index: torch.Tensor
    """int64 [M]: item index of each image token (most recent first within a sequence)."""
    image_features: torch.Tensor
    """float16 [M, d] (the feature table's dtype): the items' image features; the model casts them."""
    image_present: torch.Tensor
    """bool [M]: False = the item has no image, the learned void vector is used."""
    mlm_labels: torch.Tensor
    """int64 [T]: the original id at masked tokens, -100 elsewhere."""
    mlm_positions: torch.Tensor
    """int64 [P]: stream positions of the masked tokens (the MLM head runs only there)."""
    num_tokens: int
    """Stream length T (padding slots included)."""
    num_real_tokens: int
    """Non-padding tokens (for tokens/s)."""
    num_attention_pairs: int
    """Sum over sequences of (real length)^2: attention FLOPs, for ``training_flops``."""

    @property
    def num_sequences(self) -> int:
        """B, the number of sequences (no host sync: a tensor's shape)."""
        return self.seq_lengths.shape[0]

    @property
    def padded(self) -> bool:
        return self.layout == "padded"

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "PackedBatch":
        """The batch with every tensor on ``device``; Python fields are kept."""
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        """A copy in pinned (page-locked) host memory (what the DataLoader's ``pin_memory`` calls)."""
        return map_tensors(self, torch.Tensor.pin_memory)


@dataclass(frozen=True)
class StreamInfo:
    """Where the DataLoader worker that built a pre-training batch stood after reading its samples."""

    worker: int               # DataLoader worker id (0 without workers)
    draw: int                 # index of its shard draw (:class:`reolm.train.data.StreamPosition`)
    offset: int               # samples read in that draw
    bad: dict[str, int] = field(default_factory=dict)  # bad samples it skipped so far, by kind


@dataclass(frozen=True, eq=False)
class TrainingBatch:
    """Histories and their targets (``PackedCollator.__call__``), in example order.

    ``target`` and ``target_items`` are None when the examples have no target (a batch has a
    target for every example or for none).  ``keys`` and ``stream`` are set by the pre-training
    stream (:class:`reolm.train.data.TrainStream`): the samples' keys (the ``data.record_keys``
    audit trail) and the worker's reading position and bad-sample counts (for resume and metrics).
    """

    history: PackedBatch                          # the histories, MLM-masked
    target: PackedBatch | None = None             # one ``[CLS] item`` sequence per target
    target_items: torch.Tensor | None = None      # int64 [B]: the target item indices
    keys: list[str] = field(default_factory=list)  # the samples' keys, in example order
    stream: StreamInfo | None = None

    @property
    def num_sequences(self) -> int:
        """Examples in the batch."""
        return self.history.num_sequences

    @property
    def num_real_tokens(self) -> int:
        """Real tokens of both sides (history + target)."""
        return self.history.num_real_tokens + (self.target.num_real_tokens if self.target is not None else 0)

    def _map(self, history: Callable[[PackedBatch], PackedBatch],
             tensor: Callable[[torch.Tensor], torch.Tensor]) -> "TrainingBatch":
        return dataclasses.replace(self, history=history(self.history),
                                   target=history(self.target) if self.target is not None else None,
                                   target_items=tensor(self.target_items) if self.target_items is not None
                                   else None)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "TrainingBatch":
        """The batch with every tensor on ``device``; keys and stream info are kept."""
        return self._map(lambda b: b.to(device, non_blocking),
                         lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TrainingBatch":
        """A copy in pinned host memory (what the DataLoader's ``pin_memory`` calls)."""
        return self._map(PackedBatch.pin_memory, torch.Tensor.pin_memory)


def move_batch(batch: Any, device: torch.device | str, non_blocking: bool = True) -> Any:
    """Copy every tensor of a batch to ``device``: a tensor, anything with a ``to(device,
    non_blocking)`` method (the batch dataclasses), or lists/tuples/dicts of them; other values are kept."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type) and callable(getattr(batch, "to", None)):
        return batch.to(device, non_blocking)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device, non_blocking) for v in batch)
    return batch
