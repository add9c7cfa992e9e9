"""From item indices to packed model batches (shared by pre-training and fine-tuning).

A sequence is ``[CLS]`` followed by its items **most recent first**; each item is
its text tokens (from the :class:`ItemTokenTable`) then one image token.  All
tokens of the j-th item carry item-position id j (``[CLS]`` has 0); token types
are 0 = CLS, 1..K attributes, K+1 image, K+2 padding.  Items are added from the
most recent until the next one would exceed ``max_history_items`` or
``max_tokens``: this is the one place a history is cut to the model's budget.

Sequences are **packed** into one token stream (no padding) with int32
``cu_seqlens`` and a Python-int ``max_seqlen``; the padded-grid index each
attention backend may need is computed here too, so the model's forward never
syncs with the host.  Everything is built as CPU tensors (in DataLoader
workers) and can be pinned.  The result is a :class:`~reolm.data.batch.PackedBatch`
(fields documented there and in ``docs/model.md``); ``PackedCollator.__call__``
returns a :class:`~reolm.data.batch.TrainingBatch` (histories and targets).

Input of :class:`PackedCollator` is a list of :class:`SequenceExample`
``(history, target, domain, user, key)``: global item indices in time order
(oldest first, an int64 array), the target item index or ``None``, the
sequence's domain index (which selects the adapter in pre-training), and
optionally where the example came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from reolm.data.batch import PackedBatch, TrainingBatch, move_batch
from reolm.data.tables import ImageFeatureTable, ItemTokenTable

__all__ = ["SequenceExample", "PackedCollator", "PackedBatch", "TrainingBatch", "pack_token_sequences",
           "move_batch", "split_sequences", "attention_groups", "grid_sources", "IGNORE_INDEX"]

IGNORE_INDEX = -100
CLS_TYPE = 0


@dataclass(frozen=True, eq=False)
class SequenceExample:
    """One training/evaluation example: a history, optionally the item that follows it.

    Item indices are rows of the item tables.  ``history`` is kept whole, as an int64 array
    (a list is converted once; an int64 array is used as is): :meth:`PackedCollator.select_history`
    is where it is cut to the model's budget.  ``user`` and ``key`` say where a pre-training
    example came from (``key``: the tar key, prefixed by ``s{stream}/d{draw}/i{index}/`` when
    streamed; it is what ``data.record_keys`` logs).
    """

    history: np.ndarray          # int64 [n]: time order, oldest first
    target: int | None = None    # encoded as its own ``[CLS] item`` sequence
    domain: int = 0              # domain index (adapter routing in pre-training)
    user: int | None = None      # the user's index, when known
    key: str = ""

    def __post_init__(self) -> None:
        history = np.asarray(self.history, dtype=np.int64)
        if history.ndim != 1:
            raise ValueError(f"a history is a flat sequence of item indices, got shape {history.shape}")
        object.__setattr__(self, "history", history)


@dataclass
class _Seq:
    """One sequence's token arrays before packing."""

    ids: np.ndarray              # int64 [L]
    types: np.ndarray            # int64 [L]
    item_pos: np.ndarray         # int64 [L]
    word_starts: np.ndarray      # bool  [L] (True at word starts of text tokens)
    image_slots: np.ndarray      # int64 [M] local positions of image tokens
    image_items: np.ndarray      # int64 [M] item index of each image token
    domain: int = 0
    num_items: int = 0
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def attention_groups(lengths: np.ndarray, ratio: float) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Split a stream of sequences sorted longest first into groups for eager/sdpa attention.

    A new group starts when a sequence is shorter than ``ratio`` x its group's longest (``ratio = 0``:
    one group, everything padded to the longest).  Returns each token's slot in its group's
    ``[n, L]`` grid and per group (tokens, n, L) as Python ints.
    """
    if np.any(np.diff(lengths) > 0):
        raise ValueError("attention_groups needs lengths sorted longest first")
    grid, shapes = [], []
    first = 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or lengths[i] < ratio * lengths[first]:
            members, longest = lengths[first:i], int(lengths[first])
            grid += [local * longest + np.arange(n) for local, n in enumerate(members)]
            shapes.append((int(members.sum()), len(members), longest))
            first = i
    return np.concatenate(grid).astype(np.int64), shapes


def grid_sources(grid: np.ndarray, groups: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """For every slot of each group that has padding, the row of the group (0-based) that fills it.

    The attention backends gather such a group's ``[n, L]`` grid with it; padding slots read
    row 0, a real token (masked as a key, never read back as a query).  Groups without padding
    are viewed in place and contribute nothing.
    """
    parts, offset = [], 0
    for tokens, n, length in groups:
        if tokens != n * length:
            source = np.zeros(n * length, dtype=np.int64)
            source[grid[offset:offset + tokens]] = np.arange(tokens)
            parts.append(source)
        offset += tokens
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _assemble(seqs: list[_Seq], images: ImageFeatureTable | None, layout: str, pad_token_id: int,
              pad_type_id: int, bucket_ratio: float = 0.5, image_dim: int = 0) -> PackedBatch:
    """Concatenate sequences into a packed (or padded) stream with all metadata as tensors.

    Packed streams hold the sequences longest first, so the length groups of the grid-based
    attention backends are contiguous; ``token_seq_index`` and ``seq_cls_index`` map back to the
    examples, and every per-sequence field is in example order.
    """
    if not seqs:
        raise ValueError("cannot collate an empty batch")
    if layout not in ("packed", "padded"):
        raise ValueError(f"layout must be 'packed' or 'padded', got {layout!r}")
    lengths = np.array([len(s.ids) for s in seqs], dtype=np.int64)
    b, max_len = len(seqs), int(lengths.max())
    order = np.argsort(-lengths, kind="stable") if layout == "packed" else np.arange(b)
    stream = [seqs[i] for i in order]
    stream_lengths = lengths[order]
    if layout == "padded":
        slot_lengths = np.full(b, max_len, dtype=np.int64)  # every sequence owns max_len slots
    else:
        slot_lengths = stream_lengths
    starts = np.concatenate([[0], np.cumsum(slot_lengths)[:-1]])
    total = int(slot_lengths.sum())

    # Position of every real token in the stream, then scatter the per-token arrays there.
    real_slot = np.concatenate([st + np.arange(n) for st, n in zip(starts, stream_lengths)])

    def stream_array(name: str, fill: int) -> np.ndarray:
        out = np.full(total, fill, dtype=np.int64)
        out[real_slot] = np.concatenate([getattr(s, name) for s in stream])
        return out

    for s in stream:
        if not len(s.labels):
            s.labels = np.full(len(s.ids), IGNORE_INDEX, np.int64)
    ids, types = stream_array("ids", pad_token_id), stream_array("types", pad_type_id)
    item_pos, labels = stream_array("item_pos", 0), stream_array("labels", IGNORE_INDEX)
    positions = np.arange(total) - np.repeat(starts, slot_lengths)
    seq_index = np.repeat(order, slot_lengths)
    cls_index = np.empty(b, dtype=np.int64)
    cls_index[order] = starts
    image_slots = np.concatenate([s.image_slots + st for s, st in zip(stream, starts)]).astype(np.int64)
    image_items = np.concatenate([s.image_items for s in stream]).astype(np.int64)
    cu = np.concatenate([[0], np.cumsum(slot_lengths)])
    if layout == "padded":
        attn_grid, groups, sources = np.arange(total), [(total, b, max_len)], np.zeros(0, dtype=np.int64)
    else:
        attn_grid, groups = attention_groups(stream_lengths, bucket_ratio)
        sources = grid_sources(attn_grid, groups)

    if images is not None and len(image_items):
        feats = torch.from_numpy(np.ascontiguousarray(images.features[image_items]))
        present = torch.from_numpy(np.asarray(images.has_image[image_items], dtype=bool))
    else:
        # No table: every image slot uses the void vector, but the model's image MLP still
        # needs features of its input width to build the (discarded) projection.
        dim = images.dim if images is not None else image_dim
        feats = torch.zeros((len(image_items), dim), dtype=torch.float16)
        present = torch.zeros(len(image_items), dtype=torch.bool)

    t = torch.from_numpy
    return PackedBatch(
        input_ids=t(ids),
        token_type_ids=t(types),
        position_ids=t(positions.astype(np.int64)),
        item_position_ids=t(item_pos),
        cu_seqlens=t(cu.astype(np.int32)),
        max_seqlen=max_len,
        layout=layout,
        token_seq_index=t(seq_index.astype(np.int64)),
        seq_cls_index=t(cls_index),
        seq_lengths=t(lengths),
        stream_seq_lengths=t(np.ascontiguousarray(stream_lengths)),
        attn_grid_index=t(attn_grid.astype(np.int64)),
        attn_grid_source=t(sources),
        attn_groups=groups,
        seq_domains=torch.tensor([s.domain for s in seqs], dtype=torch.int64),
        seq_num_items=torch.tensor([s.num_items for s in seqs], dtype=torch.int64),
        image_token_index=t(image_slots),
        image_item_index=t(image_items),
        image_features=feats,
        image_present=present,
        mlm_labels=t(labels),
        mlm_positions=t(np.flatnonzero(labels != IGNORE_INDEX).astype(np.int64)),
        num_tokens=total,
        num_real_tokens=int(lengths.sum()),
        num_attention_pairs=int((lengths ** 2).sum()),  # (query, key) pairs of the real tokens
    )


def pack_token_sequences(input_ids: Sequence[Sequence[int]], token_type_ids: Sequence[Sequence[int]] | None = None,
                         item_position_ids: Sequence[Sequence[int]] | None = None,
                         domains: Sequence[int] | None = None, layout: str = "packed",
                         pad_token_id: int = 0, pad_type_id: int = 0, bucket_ratio: float = 0.5
                         ) -> PackedBatch:
    """Pack plain token sequences (no items, no image tokens, no MLM) into a model batch.

    For encoding arbitrary text and for tests; types and item positions default to 0.
    """
    seqs = []
    for i, ids in enumerate(input_ids):
        ids = np.asarray(ids, dtype=np.int64)
        zeros = np.zeros(len(ids), np.int64)
        seqs.append(_Seq(ids=ids,
                         types=np.asarray(token_type_ids[i], np.int64) if token_type_ids else zeros,
                         item_pos=np.asarray(item_position_ids[i], np.int64) if item_position_ids else zeros,
                         word_starts=np.zeros(len(ids), bool), image_slots=np.zeros(0, np.int64),
                         image_items=np.zeros(0, np.int64), domain=int(domains[i]) if domains else 0))
    return _assemble(seqs, None, layout, pad_token_id, pad_type_id, bucket_ratio)


class PackedCollator:
    """Turns :class:`SequenceExample` lists into packed batches (see module docstring).

    ``__call__`` returns a :class:`TrainingBatch` (``history``, ``target`` or None, ``target_items``
    or None, the examples' ``keys``); :meth:`collate_items` gives the :class:`PackedBatch` of bare
    items (``[CLS] item``) for item vectors.
    """

    def __init__(self, tokens: ItemTokenTable, images: ImageFeatureTable | None, *, cls_token_id: int,
                 mask_token_id: int, pad_token_id: int, vocab_size: int, num_attributes: int,
                 max_history_items: int = 50, max_tokens: int = 1024, mlm_probability: float = 0.15,
                 mask_targets: bool = False, num_domains: int | None = None, layout: str = "packed",
                 bucket_ratio: float = 0.5, seed: int | None = None, image_dim: int = 0):
        if images is not None and len(images) != len(tokens):
            raise ValueError(f"image table has {len(images)} rows but the token table has {len(tokens)} items")
        if tokens.num_attributes and tokens.num_attributes != num_attributes:
            raise ValueError(f"token table was built for {tokens.num_attributes} attributes "
                             f"{list(tokens.attributes)} but the model expects {num_attributes}")
        if max_tokens < 3:
            raise ValueError("max_tokens must leave room for [CLS], one text token and the image token")
        self.tokens, self.images = tokens, images
        self.cls_token_id, self.mask_token_id, self.pad_token_id = cls_token_id, mask_token_id, pad_token_id
        self.vocab_size = vocab_size
        self.image_type_id, self.pad_type_id = num_attributes + 1, num_attributes + 2
        self.max_history_items, self.max_tokens = max_history_items, max_tokens
        self.mlm_probability, self.mask_targets = mlm_probability, mask_targets
        self.num_domains, self.layout, self.seed = num_domains, layout, seed
        self.bucket_ratio = bucket_ratio
        self.image_dim = images.dim if images is not None else image_dim
        self._offsets = np.asarray(tokens.offsets)
        self._rng: np.random.Generator | None = None
        self._rng_known: np.random.Generator | None = None  # the generator this process adopted
        self._rng_owner: int | None = None

    @classmethod
    def from_config(cls, tokens: ItemTokenTable, images: ImageFeatureTable | None, tokenizer: Any, cfg: Any,
                    **overrides: Any) -> "PackedCollator":
        """Settings from a :class:`reolm.model.ModelConfig` and special ids from the tokenizer."""
        kwargs = dict(cls_token_id=tokenizer.cls_token_id, mask_token_id=tokenizer.mask_token_id,
                      pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                      num_attributes=cfg.num_attributes, max_history_items=cfg.max_history_items,
                      max_tokens=cfg.max_tokens,
                      mlm_probability=cfg.mlm_probability, num_domains=cfg.num_adapters,
                      bucket_ratio=cfg.attention_bucket_ratio, image_dim=cfg.image_feature_dim)
        kwargs.update(overrides)
        return cls(tokens, images, **kwargs)

    # ------------------------------------------------------------------ randomness
    @property
    def rng(self) -> np.random.Generator:
        """The masking generator of the current process.

        Created on first use: in a DataLoader worker from ``seed`` and the worker's seed (which
        torch draws anew each epoch from the main process's RNG, so masks differ per worker and
        epoch yet repeat after ``torch.manual_seed``); in the main process from ``seed`` (or
        ``torch.initial_seed()``).  A generator inherited through a fork is never reused, so
        workers do not repeat each other.  :meth:`reseed` (or assigning ``_rng``) pins it.
        """
        pid = os.getpid()
        assigned = self._rng is not self._rng_known  # set from outside (reseed or ``_rng = ...``)
        if self._rng is not None and (assigned or self._rng_owner == pid):
            self._rng_known, self._rng_owner = self._rng, pid
            return self._rng
        info = torch.utils.data.get_worker_info()
        if info is not None:
            key = [self.seed or 0, info.seed % 2**63]
        else:
            key = [self.seed] if self.seed is not None else [0, torch.initial_seed() % 2**63]
        self._rng = self._rng_known = np.random.default_rng(key)
        self._rng_owner = pid
        return self._rng

    def reseed(self, seed: int | Sequence[int]) -> None:
        """Make the following masks a function of ``seed`` (e.g. a per-batch seed for exact resume)."""
        self._rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ sequence building
    def select_history(self, history: np.ndarray | Sequence[int]) -> list[int]:
        """Most recent first, until the next item would exceed max_history_items or max_tokens.

        The one place a history is cut to the model's budget (callers pass it whole)."""
        chosen: list[int] = []
        used = 1  # [CLS]
        for item in history[::-1]:
            if len(chosen) == self.max_history_items:
                break
            self._check_item(item)
            cost = int(self._offsets[item + 1] - self._offsets[item]) + 1  # text + image token
            if used + cost > self.max_tokens:
                break
            chosen.append(int(item))
            used += cost
        return chosen

    def _check_item(self, item: int) -> None:
        if not 0 <= item < len(self.tokens):
            raise ValueError(f"item index {item} is out of range for a table of {len(self.tokens)} items")

    def build_sequence(self, items: Sequence[int], domain: int, mlm: bool) -> _Seq:
        """``[CLS]`` + (text, image) per item in the given order (already most recent first)."""
        if self.num_domains is not None and not 0 <= domain < self.num_domains:
            raise ValueError(f"domain index {domain} is out of range: the model routes {self.num_domains} "
                             f"domains (model.num_adapters)")
        ids, types, pos, starts = [np.array([self.cls_token_id])], [np.array([CLS_TYPE])], [np.array([0])], \
            [np.array([False])]
        image_slots, length = [], 1
        budget = self.max_tokens - 2
        for j, item in enumerate(items, start=1):
            self._check_item(item)
            t_ids, t_types, t_starts = (np.asarray(a)[:budget] for a in self.tokens.item(item))
            w = t_starts.astype(bool)
            if len(w):
                w[0] = True  # words never span items
            ids += [t_ids, np.array([self.pad_token_id])]
            types += [t_types, np.array([self.image_type_id])]
            pos += [np.full(len(t_ids) + 1, j)]
            starts += [w, np.array([False])]
            length += len(t_ids)
            image_slots.append(length)
            length += 1
        seq = _Seq(ids=np.concatenate(ids).astype(np.int64), types=np.concatenate(types).astype(np.int64),
                   item_pos=np.concatenate(pos).astype(np.int64), word_starts=np.concatenate(starts),
                   image_slots=np.asarray(image_slots, np.int64), image_items=np.asarray(items, np.int64),
                   domain=int(domain), num_items=len(items))
        if mlm and self.mlm_probability > 0:
            self.mask_whole_words(seq)
        return seq

    def mask_whole_words(self, seq: _Seq) -> None:
        """15% whole-word masking of text tokens, 80% [MASK] / 10% random / 10% unchanged (in place)."""
        text = (seq.types >= 1) & (seq.types <= self.image_type_id - 1)
        starts = seq.word_starts & text
        word_id = np.cumsum(starts) - 1
        num_words = int(starts.sum())
        labels = np.full(len(seq.ids), IGNORE_INDEX, np.int64)
        if num_words:
            chosen_words = self.rng.random(num_words) < self.mlm_probability
            chosen = text & chosen_words[np.clip(word_id, 0, None)]
            labels[chosen] = seq.ids[chosen]
            r = self.rng.random(len(seq.ids))
            to_mask = chosen & (r < 0.8)
            to_random = chosen & (r >= 0.8) & (r < 0.9)
            seq.ids = seq.ids.copy()
            seq.ids[to_mask] = self.mask_token_id
            seq.ids[to_random] = self.rng.integers(0, self.vocab_size, int(to_random.sum()))
        seq.labels = labels

    # ------------------------------------------------------------------ public entry points
    def __call__(self, examples: Sequence[SequenceExample | tuple]) -> TrainingBatch:
        examples = [e if isinstance(e, SequenceExample) else SequenceExample(*e) for e in examples]
        has_target = [e.target is not None for e in examples]
        if any(has_target) and not all(has_target):
            raise ValueError("either every example of a batch has a target or none has")
        history = self._assemble([self.build_sequence(self.select_history(e.history), e.domain, mlm=True)
                                  for e in examples])
        keys = [e.key for e in examples]
        if not all(has_target):
            return TrainingBatch(history, keys=keys)
        targets = [e.target for e in examples]
        target = self.collate_items(targets, [e.domain for e in examples], mlm=self.mask_targets)
        return TrainingBatch(history, target, torch.tensor(targets, dtype=torch.int64), keys=keys)

    def collate_items(self, items: Sequence[int], domains: Sequence[int] | int = 0,
                      mlm: bool = False) -> PackedBatch:
        """A batch of ``[CLS] item`` sequences (item vectors, e.g. targets or all items of a domain)."""
        if isinstance(domains, int):
            domains = [domains] * len(items)
        return self._assemble([self.build_sequence([int(i)], d, mlm) for i, d in zip(items, domains)])

    def _assemble(self, seqs: list[_Seq]) -> PackedBatch:
        return _assemble(seqs, self.images, self.layout, self.pad_token_id, self.pad_type_id, self.bucket_ratio,
                         self.image_dim)


def split_sequences(stream: torch.Tensor, batch: PackedBatch) -> list[torch.Tensor]:
    """Per-token values of a stream (e.g. ``EncoderOutput.hidden``) cut into one tensor per example,
    in example order, real tokens only.  For inspection and tests: it syncs with the host."""
    starts = batch.seq_cls_index.tolist()
    return [stream[start:start + n] for start, n in zip(starts, batch.seq_lengths.tolist())]
