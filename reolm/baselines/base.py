"""What every ID-based baseline shares: padding, the Recommender interface, a training loss.

Sequences are item indices (0-based, from the domain) in time order.  Batches are
right-padded with ``pad_index = num_items``: position ``t < length`` holds a real item,
so causal models read the user's state at ``length - 1`` without ever seeing padding.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ITEM_INIT_STD", "pad_right", "IDModel", "SequentialBaseline", "NextItemBaseline", "gather_last", "full_softmax_ce"]

#: Std of the normal init of the item embedding rows (also the scale text-derived rows are given).
ITEM_INIT_STD = 0.02

#: Largest [rows, num_items] logit block materialised at once by full_softmax_ce (256 MB in fp32).
MAX_LOGITS = 1 << 26


def pad_right(sequences: Sequence[Sequence[int]], pad_index: int, length: int | None = None,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L] item ids right-padded with ``pad_index``, [B] lengths); L = longest or ``length``."""
    lengths = [len(s) for s in sequences]
    if not lengths or min(lengths) == 0:
        raise ValueError("cannot pad an empty batch or an empty sequence")
    width = length or max(lengths)
    ids = torch.full((len(sequences), width), pad_index, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.as_tensor(seq[-width:] if len(seq) > width else seq, dtype=torch.long)
    lens = torch.as_tensor([min(n, width) for n in lengths], dtype=torch.long)
    return ids.to(device), lens.to(device)


def gather_last(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, H] at position ``lengths - 1`` of each row -> [B, H]."""
    index = (lengths - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1)


def _ce_sum(states: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    logits = states @ table.T
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits, targets, reduction="sum")


def full_softmax_ce(states: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, max_logits: int = MAX_LOGITS) -> torch.Tensor:
    """Mean cross-entropy of ``states`` [M, H] over all items ``table`` [N, H] (+ ``bias`` [N]).

    Computed ``max_logits // N`` rows at a time with activation checkpointing (logits are
    recomputed in backward), so memory stays bounded when M x N is large: 256 x 50 positions
    against 100K items would otherwise hold 1.3 G logits and their gradient.
    """
    rows = max(1, max_logits // table.shape[0])
    if states.shape[0] <= rows:
        return _ce_sum(states, table, targets, bias) / states.shape[0]
    total = states.new_zeros(())
    for start in range(0, states.shape[0], rows):
        end = start + rows
        total = total + checkpoint(_ce_sum, states[start:end], table, targets[start:end], bias, use_reentrant=False)
    return total / states.shape[0]


class IDModel(nn.Module):
    """A model whose items are rows of its own tables (every baseline): it reads nothing from the
    domain it scores, so :meth:`bind` (the Recommender interface) has nothing to do."""

    def bind(self, domain: object) -> "IDModel":
        return self


class SequentialBaseline(IDModel):
    """Base class: subclasses define ``encode_histories``, ``training_loss`` and ``train_window``.

    Scores are dot products between user vectors and the (tied) item embedding rows.

    :meth:`set_training_items` restricts the training losses (softmax and sampled negatives)
    to the items that occur in the training data, so the rows of the others are never
    trained: an item unseen in training is scored by its initial row, as a newly added item
    would be, not by a row the loss has pushed down because the item was known to be absent.
    """

    similarity = "dot"
    temperature = 1.0

    def __init__(self, num_items: int, max_history_items: int) -> None:
        super().__init__()
        if num_items < 2:
            raise ValueError(f"a baseline needs at least 2 items, got {num_items}")
        self.num_items = int(num_items)
        self.pad_index = self.num_items
        self.max_history_items = int(max_history_items)
        # Trained items and each item's position among them (-1 = unseen); None = all items.
        self.register_buffer("train_items", None, persistent=False)
        self.register_buffer("train_position", None, persistent=False)

    def set_training_items(self, seen: torch.Tensor | None) -> None:
        """Train only on the items where ``seen`` (bool [num_items]) is true; None = all items."""
        if seen is None or bool(seen.all()):
            self.train_items = self.train_position = None
            return
        if seen.shape != (self.num_items,):
            raise ValueError(f"seen must have shape ({self.num_items},), got {tuple(seen.shape)}")
        items = torch.nonzero(seen.to(torch.bool)).squeeze(1)
        if items.numel() < 2:
            raise ValueError(f"only {items.numel()} item(s) occur in training; a baseline needs at least 2")
        position = torch.full((self.num_items,), -1, dtype=torch.long)
        position[items] = torch.arange(items.numel())
        self.train_items, self.train_position = items.to(self.device), position.to(self.device)

    def candidate_ce(self, states: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax cross-entropy over the trained items (all items unless restricted)."""
        if self.train_items is None:
            return full_softmax_ce(states, table, targets, bias)
        keep = self.train_items
        return full_softmax_ce(states, table[keep], self.train_position[targets],
                               None if bias is None else bias[keep])

    def sample_negatives(self, positives: torch.Tensor) -> torch.Tensor:
        """One negative per positive, uniform over the trained items other than the positive."""
        pool = self.num_items if self.train_items is None else self.train_items.numel()
        rank = positives if self.train_items is None else self.train_position[positives]
        draw = torch.randint(0, pool - 1, positives.shape, device=positives.device)
        draw = draw + (draw >= rank).long()  # skip the positive itself
        return draw if self.train_items is None else self.train_items[draw]

    # -- Recommender interface ----------------------------------------------------------
    @property
    def default_max_history(self) -> int:
        return self.max_history_items

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def item_vectors(self) -> torch.Tensor:
        raise NotImplementedError

    def user_vectors(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        raise NotImplementedError

    # -- training --------------------------------------------------------------------------
    @property
    def train_window(self) -> int:
        """How many of the most recent training items one training example uses: the history and,
        for next-item models, each position's target (BERT4Rec: its cloze window with the [MASK])."""
        return self.max_history_items + 1

    @property
    def copies_per_epoch(self) -> int:
        """How many times each training sequence appears in one epoch (shuffled)."""
        return 1

    def training_loss(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean loss of a right-padded batch of training sequences [B, train_window]."""
        raise NotImplementedError


class NextItemBaseline(SequentialBaseline):
    """Causal models (SASRec, GRU4Rec): every position predicts the following item.

    ``loss="ce"`` is softmax cross-entropy over all items; ``loss="bce"`` the original binary
    loss on the positive and one uniformly sampled negative item per position.
    """

    def __init__(self, num_items: int, max_history_items: int, hidden: int, loss: str) -> None:
        super().__init__(num_items, max_history_items)
        if loss not in ("ce", "bce"):
            raise ValueError(f"loss must be 'ce' or 'bce', got {loss!r}")
        self.loss_kind = loss
        self.item_embedding = nn.Embedding(num_items + 1, hidden, padding_idx=self.pad_index)
        nn.init.normal_(self.item_embedding.weight, std=ITEM_INIT_STD)
        with torch.no_grad():
            self.item_embedding.weight[self.pad_index].zero_()

    @torch.no_grad()
    def set_item_rows(self, rows: torch.Tensor) -> None:
        """Start from these item rows ([num_items, hidden], e.g. text-derived) instead of the random ones."""
        table = self.item_embedding.weight
        if rows.shape != (self.num_items, table.shape[1]):
            raise ValueError(f"item rows must have shape ({self.num_items}, {table.shape[1]}), got {tuple(rows.shape)}")
        table[:self.num_items] = rows.to(table)

    def sequence_states(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, L, H] state after each position (causal: position t sees items <= t)."""
        raise NotImplementedError

    def item_vectors(self) -> torch.Tensor:
        return self.item_embedding.weight[:self.num_items]

    def user_vectors(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        ids, lengths = pad_right([h[-self.max_history_items:] for h in histories], self.pad_index, device=self.device)
        return gather_last(self.sequence_states(ids, lengths), lengths)

    def training_loss(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        inputs, targets = ids[:, :-1], ids[:, 1:]
        valid = targets != self.pad_index
        states = self.sequence_states(inputs, (lengths - 1).clamp(min=1))[valid]   # [M, H]
        positives = targets[valid]
        if self.loss_kind == "ce":
            return self.candidate_ce(states, self.item_vectors(), positives)
        negatives = self.sample_negatives(positives)
        table = self.item_embedding
        pos_logit = (states * table(positives)).sum(-1)
        neg_logit = (states * table(negatives)).sum(-1)
        bce = F.binary_cross_entropy_with_logits
        return bce(pos_logit, torch.ones_like(pos_logit)) + bce(neg_logit, torch.zeros_like(neg_logit))
