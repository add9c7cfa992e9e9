"""GRU4Rec: a GRU over item-ID embeddings (Hidasi et al., ICLR 2016).

The GRU state is projected back to the embedding space and scored against the tied item
embeddings.  Defaults: 1 layer, hidden 64, max length 50, input dropout 0.3.
"""

from __future__ import annotations

import torch
from torch import nn

from reolm.baselines.base import NextItemBaseline
from reolm.baselines.config import GRU4RecConfig

__all__ = ["GRU4Rec"]


class GRU4Rec(NextItemBaseline):
    def __init__(self, num_items: int, cfg: GRU4RecConfig) -> None:
        super().__init__(num_items, cfg.max_history_items, cfg.hidden, cfg.loss)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.hidden, cfg.hidden, num_layers=cfg.layers, batch_first=True)
        self.project = nn.Linear(cfg.hidden, cfg.hidden)

    def sequence_states(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Right padding: the padding comes after every real step, so the causal GRU output
        # at a real position never depends on it.
        states, _ = self.gru(self.input_dropout(self.item_embedding(ids)))
        return self.project(states)
