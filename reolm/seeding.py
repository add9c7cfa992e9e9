"""Seeding of every random number generator a training process uses, in one place."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything", "RANK_SEED_STRIDE"]

# Ranks of one run draw different dropout and masks: rank r seeds with seed + RANK_SEED_STRIDE x r.
RANK_SEED_STRIDE = 1000


def seed_everything(seed: int, rank: int = 0) -> torch.Generator:
    """Seed Python's, NumPy's and torch's global generators for ``rank`` of a run seeded ``seed``.

    Returns a fresh torch generator seeded the same way, for code that wants its own stream
    (the baselines' epoch shuffling)."""
    seed = seed + RANK_SEED_STRIDE * rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
