"""Model kind -> trainer and model kind -> loader, imported lazily.

A *trainer* is ``train(cfg: FinetuneConfig, domain: Domain, run_dir: Path, *, init, backbone)
-> dict`` that trains, keeps ``run_dir/best/`` and returns the metrics.json document it wrote.
A *loader* is ``load(folder: Path) -> Recommender`` for a saved ``best/`` folder whose
``recommender.json`` names that kind.

The Reo-LM fine-tuning registers here by replacing the ``None`` entries below with
"module:function" paths; until then ``--model reolm`` stops with a clear message.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["TRAINERS", "LOADERS", "NotImplementedModel", "get_trainer", "get_loader", "load_recommender"]

_BASELINE_TRAINER = "reolm.finetune.baseline_trainer:train_baseline"
_BASELINE_LOADER = "reolm.baselines.registry:load_baseline"

TRAINERS: dict[str, str | None] = {
    "pop": _BASELINE_TRAINER,
    "sasrec": _BASELINE_TRAINER,
    "gru4rec": _BASELINE_TRAINER,
    "bert4rec": _BASELINE_TRAINER,
    "reolm": None,  # filled by the Reo-LM fine-tuning (reolm/finetune/reolm_trainer.py)
}

LOADERS: dict[str, str | None] = {
    "pop": _BASELINE_LOADER,
    "sasrec": _BASELINE_LOADER,
    "gru4rec": _BASELINE_LOADER,
    "bert4rec": _BASELINE_LOADER,
    "reolm": None,
    "reolm-nopretrain": None,
    "reolm-zeroshot": None,
}


class NotImplementedModel(ValueError):
    """The model kind is registered but its implementation is not there yet."""


def _resolve(table: dict[str, str | None], kind: str, what: str) -> Callable[..., Any]:
    if kind not in table:
        raise ValueError(f"unknown model {kind!r}; known: {', '.join(table)}")
    target = table[kind]
    if target is None:
        raise NotImplementedModel(f"model {kind!r}: {what} is not implemented yet "
                                  f"(register it in reolm.finetune.registry)")
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def get_trainer(kind: str) -> Callable[..., dict]:
    return _resolve(TRAINERS, kind, "fine-tuning")


def get_loader(kind: str) -> Callable[..., Any]:
    return _resolve(LOADERS, kind, "loading a saved model")


def load_recommender(path: Any) -> tuple[Any, dict[str, Any]]:
    """(model, descriptor) for a run directory, its ``best/`` or any saved model folder."""
    from reolm.eval.saved import read_descriptor, resolve_model_dir

    folder = resolve_model_dir(path)
    desc = read_descriptor(folder)
    return get_loader(desc["model"])(folder), desc
