"""Model kind -> trainer and model kind -> loader, imported lazily.

A *trainer* is ``train(cfg: FinetuneConfig, domain: Domain, run_dir: Path, *, init, backbone)
-> dict`` that trains, keeps ``run_dir/best/`` and returns the metrics.json document it wrote.
A *loader* is ``load(folder: Path) -> Recommender`` for a saved ``best/`` folder whose
``recommender.json`` names that kind.

Reo-LM (``reolm/finetune/reolm_trainer.py``) saves ``best/`` as an HF-style export plus the
descriptor; a bare pre-trained export (``config.json`` with ``model_type: reolm`` and no
descriptor) is evaluated as ``reolm-zeroshot``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["TRAINERS", "LOADERS", "NotImplementedModel", "get_trainer", "get_loader", "load_recommender",
           "resolve_saved_model", "is_reolm_export"]

_BASELINE_TRAINER = "reolm.finetune.baseline_trainer:train_baseline"
_BASELINE_LOADER = "reolm.baselines.registry:load_baseline"
_REOLM_LOADER = "reolm.finetune.reolm_recommender:load_reolm"

TRAINERS: dict[str, str | None] = {
    "pop": _BASELINE_TRAINER,
    "sasrec": _BASELINE_TRAINER,
    "gru4rec": _BASELINE_TRAINER,
    "bert4rec": _BASELINE_TRAINER,
    "reolm": "reolm.finetune.reolm_trainer:train_reolm",
}

LOADERS: dict[str, str | None] = {
    "pop": _BASELINE_LOADER,
    "sasrec": _BASELINE_LOADER,
    "gru4rec": _BASELINE_LOADER,
    "bert4rec": _BASELINE_LOADER,
    "reolm": _REOLM_LOADER,
    "reolm-nopretrain": _REOLM_LOADER,
    "reolm-zeroshot": _REOLM_LOADER,
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


def is_reolm_export(path: Any) -> bool:
    """True for a directory written by ``ReoLM.save_pretrained`` (config.json model_type reolm)."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "reolm"
    except (OSError, ValueError):
        return False


def resolve_saved_model(path: Any) -> tuple[Any, dict[str, Any]]:
    """(folder, descriptor) of a run directory, its ``best/``, any saved model folder, or a bare
    Reo-LM export (descriptor ``{"model": "reolm-zeroshot"}``, no fine-tuning)."""
    from pathlib import Path

    from reolm.eval.saved import read_descriptor, resolve_model_dir

    try:
        folder = resolve_model_dir(path)
    except FileNotFoundError:
        if not is_reolm_export(path):
            raise
        return Path(path), {"model": "reolm-zeroshot", "format_version": 1}
    return folder, read_descriptor(folder)


def load_recommender(path: Any) -> tuple[Any, dict[str, Any]]:
    """(model, descriptor) for a run directory, its ``best/``, any saved model folder or an export."""
    folder, desc = resolve_saved_model(path)
    return get_loader(desc["model"])(folder), desc
