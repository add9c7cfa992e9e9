"""Popularity: every user gets the same ranking, items by number of training interactions.

Expressed as 1-d vectors (user = 1, item = count) so that it is ranked by the same code as
every other model; counts are exact integers in float64, so ties are exact.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from reolm.baselines.base import IDModel

__all__ = ["Popularity"]


class Popularity(IDModel):
    similarity = "dot"
    temperature = 1.0
    default_max_history = 1  # the history is ignored

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.num_items = int(num_items)
        self.register_buffer("counts", torch.zeros(num_items, dtype=torch.float64))

    def fit(self, sequences: Iterable[Sequence[int]]) -> "Popularity":
        """Count item occurrences in ``sequences`` (replacing earlier counts)."""
        flat = [item for seq in sequences for item in seq]
        counts = torch.bincount(torch.as_tensor(flat, dtype=torch.long), minlength=self.num_items)
        self.counts.copy_(counts[:self.num_items].to(torch.float64))
        return self

    def item_vectors(self) -> torch.Tensor:
        return self.counts.unsqueeze(1)

    def user_vectors(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.ones(len(histories), 1, dtype=torch.float64, device=self.counts.device)
