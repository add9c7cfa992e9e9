"""SASRec: causal self-attention over item-ID embeddings (Kang & McAuley, ICDM 2018).

Item embeddings are tied between input and output; a user is the state at the last
history position.  Defaults: 2 blocks, 2 heads, hidden 64, max length 50, dropout 0.2.
"""

from __future__ import annotations

import math

import torch

from reolm.baselines.base import NextItemBaseline
from reolm.baselines.config import SASRecConfig
from reolm.baselines.transformer import TransformerEncoder

__all__ = ["SASRec"]


class SASRec(NextItemBaseline):
    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        super().__init__(num_items, cfg.max_history_items, cfg.hidden, cfg.loss)
        self.scale = math.sqrt(cfg.hidden)
        self.encoder = TransformerEncoder(cfg.hidden, cfg.heads, cfg.blocks, cfg.max_history_items, cfg.dropout,
                                          causal=True)

    def sequence_states(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.item_embedding(ids) * self.scale, lengths)
