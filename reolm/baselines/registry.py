"""Baseline name -> model class and config section; building and loading saved models."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from torch import nn

from reolm.baselines.bert4rec import BERT4Rec
from reolm.baselines.config import BERT4RecConfig, GRU4RecConfig, SASRecConfig
from reolm.baselines.gru4rec import GRU4Rec
from reolm.baselines.popularity import Popularity
from reolm.baselines.sasrec import SASRec
from reolm.config import from_dict
from reolm.saved.folder import load_weights, read_descriptor

__all__ = ["BASELINES", "TEXT_INIT_SASREC", "build_baseline", "load_baseline"]

TEXT_INIT_SASREC = "sasrec-textinit"

# name -> (config section class or None, constructor(num_items, section) -> nn.Module)
BASELINES: dict[str, tuple[type | None, Callable[[int, Any], nn.Module]]] = {
    "pop": (None, lambda num_items, _cfg: Popularity(num_items)),
    "sasrec": (SASRecConfig, SASRec),
    "gru4rec": (GRU4RecConfig, GRU4Rec),
    "bert4rec": (BERT4RecConfig, BERT4Rec),
    # SASRec whose item rows started from a content model's item vectors (sasrec.item_init): the
    # same model once trained, recorded under its own name so reports keep the two apart.
    TEXT_INIT_SASREC: (SASRecConfig, SASRec),
}


def build_baseline(name: str, num_items: int, section: Any = None) -> nn.Module:
    """A freshly initialised baseline ``name`` for ``num_items`` items."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    section_cls, make = BASELINES[name]
    if section_cls is not None and section is None:
        section = section_cls()
    return make(num_items, section)


def load_baseline(folder: str | Path, cfg: Any = None, domain: Any = None) -> nn.Module:
    """Loader (:mod:`reolm.saved.kinds`) of every baseline: rebuilt from a saved folder
    (recommender.json + model.safetensors), which holds every setting (``cfg`` and ``domain`` unused)."""
    desc = read_descriptor(folder)
    name = desc["model"]
    section_cls, _ = BASELINES[name]
    section = from_dict(section_cls, desc.get("model_config") or {}) if section_cls else None
    model = build_baseline(name, int(desc["num_items"]), section)
    load_weights(model, folder)
    return model


def section_dict(section: Any) -> dict[str, Any]:
    return dataclasses.asdict(section) if section is not None else {}
