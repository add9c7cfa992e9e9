"""ID-based baselines: popularity, SASRec, GRU4Rec, BERT4Rec (PyTorch implementations).

``build_baseline(name, num_items, section)`` makes a fresh model; ``save_recommender`` /
``load_baseline`` write and read a self-describing ``best/`` folder.
"""

from __future__ import annotations

from reolm.baselines.registry import BASELINES, build_baseline, load_baseline

__all__ = ["BASELINES", "build_baseline", "load_baseline"]
