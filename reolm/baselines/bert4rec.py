"""BERT4Rec: bidirectional self-attention trained with a cloze task (Sun et al., CIKM 2019).

Training masks each item with probability ``mask_prob`` and predicts it by softmax over all
items; one item per sequence is always masked, the last one with probability
``mask_last_prob`` (so training also sees the inference situation).  Each sequence appears
``dupe`` times per epoch, masked differently each time (the original code's dupe_factor).  At inference a ``[MASK]`` is appended after the
(most recent ``max_history_items``) history items and its output is the user vector.  The output
layer is dense + GELU + LayerNorm, then a dot product with the tied item embeddings plus
a per-item bias; the bias is folded into the vectors (user ``[h, 1]``, item ``[e, b]``) so
evaluation stays a plain dot product.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from reolm.baselines.base import SequentialBaseline, gather_last, pad_right
from reolm.baselines.config import BERT4RecConfig
from reolm.baselines.transformer import TransformerEncoder

__all__ = ["BERT4Rec"]


class BERT4Rec(SequentialBaseline):
    def __init__(self, num_items: int, cfg: BERT4RecConfig) -> None:
        super().__init__(num_items, cfg.max_history_items)
        self.mask_index = num_items + 1
        self.mask_prob = cfg.mask_prob
        self.mask_last_prob = cfg.mask_last_prob
        self.dupe = cfg.dupe
        self.item_embedding = nn.Embedding(num_items + 2, cfg.hidden, padding_idx=self.pad_index)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[self.pad_index].zero_()
        self.encoder = TransformerEncoder(cfg.hidden, cfg.heads, cfg.blocks, cfg.max_history_items + 1, cfg.dropout,
                                          causal=False)
        self.head = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(), nn.LayerNorm(cfg.hidden))
        self.output_bias = nn.Parameter(torch.zeros(num_items))

    @property
    def copies_per_epoch(self) -> int:
        return self.dupe

    def _states(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.item_embedding(ids), lengths))

    def item_vectors(self) -> torch.Tensor:
        return torch.cat([self.item_embedding.weight[:self.num_items], self.output_bias.unsqueeze(1)], dim=1)

    def user_vectors(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        keep = self.max_history_items
        with_mask = [list(h[-keep:]) + [self.mask_index] for h in histories]
        ids, lengths = pad_right(with_mask, self.pad_index, device=self.device)
        state = gather_last(self._states(ids, lengths), lengths)
        return torch.cat([state, torch.ones_like(state[:, :1])], dim=1)

    def training_loss(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        real = ids != self.pad_index
        masked = (torch.rand(ids.shape, device=ids.device) < self.mask_prob) & real
        # Guarantee one masked item per sequence: the last item with probability mask_last_prob
        # (the inference situation: [MASK] after the history), else a random real position.
        random_pos = (torch.rand(lengths.shape, device=ids.device) * lengths).long()
        use_last = torch.rand(lengths.shape, device=ids.device) < self.mask_last_prob
        forced = torch.where(use_last, lengths - 1, random_pos)
        masked[torch.arange(ids.shape[0], device=ids.device), forced] = True
        inputs = ids.masked_fill(masked, self.mask_index)
        states = self._states(inputs, lengths)[masked]                       # [M, H]
        return self.candidate_ce(states, self.item_embedding.weight[:self.num_items], ids[masked], self.output_bias)
