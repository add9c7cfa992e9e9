"""Model kind -> trainer and model kind -> loader, imported lazily.

A *trainer* is ``train(cfg: FinetuneConfig, domain: Domain, run_dir: Path, *, init, backbone)
-> dict`` that trains, keeps ``run_dir/best/`` and returns the metrics.json document it wrote.
A *loader* is ``load(folder: Path) -> Recommender`` for a saved ``best/`` folder whose
``recommender.json`` names that kind.

Reo-LM (``reolm/finetune/reolm_trainer.py``) saves ``best/`` as an HF-style export plus the
descriptor; a bare pre-trained export (``config.json`` with ``model_type: reolm`` and no
descriptor) is evaluated as ``reolm-zeroshot``; a plain HF BERT/RoBERTa checkpoint, or the export
``reolm export backbone`` makes of one (``origin: backbone``), as ``plm-zeroshot``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["TRAINERS", "LOADERS", "get_trainer", "get_loader", "load_recommender",
           "resolve_saved_model", "is_reolm_export", "is_hf_backbone", "export_origin", "PLM_ZEROSHOT",
           "BACKBONE_ORIGIN"]

PLM_ZEROSHOT = "plm-zeroshot"
BACKBONE_ORIGIN = "backbone"  # config.json "origin" of an export made from a plain checkpoint

_BASELINE_TRAINER = "reolm.finetune.baseline_trainer:train_baseline"
_BASELINE_LOADER = "reolm.baselines.registry:load_baseline"
_REOLM_LOADER = "reolm.finetune.reolm_recommender:load_reolm"

TRAINERS: dict[str, str] = {
    "pop": _BASELINE_TRAINER,
    "sasrec": _BASELINE_TRAINER,
    "gru4rec": _BASELINE_TRAINER,
    "bert4rec": _BASELINE_TRAINER,
    "reolm": "reolm.finetune.reolm_trainer:train_reolm",
}

LOADERS: dict[str, str] = {
    "pop": _BASELINE_LOADER,
    "sasrec": _BASELINE_LOADER,
    "sasrec-textinit": _BASELINE_LOADER,
    "gru4rec": _BASELINE_LOADER,
    "bert4rec": _BASELINE_LOADER,
    "reolm": _REOLM_LOADER,
    "reolm-nopretrain": _REOLM_LOADER,
    "reolm-id": _REOLM_LOADER,             # transductive (reolm.item_id_embedding)
    "reolm-nopretrain-id": _REOLM_LOADER,
    "reolm-zeroshot": _REOLM_LOADER,
    PLM_ZEROSHOT: "reolm.finetune.reolm_recommender:load_plm",
}


def _resolve(table: dict[str, str], kind: str) -> Callable[..., Any]:
    if kind not in table:
        raise ValueError(f"unknown model {kind!r}; known: {', '.join(table)}")
    module, _, func = table[kind].partition(":")
    return getattr(importlib.import_module(module), func)


def get_trainer(kind: str) -> Callable[..., dict]:
    return _resolve(TRAINERS, kind)


def get_loader(kind: str) -> Callable[..., Any]:
    return _resolve(LOADERS, kind)


def _config_json(path: Any) -> dict[str, Any]:
    """A directory's config.json, or {} when it has none or it is unreadable."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    try:
        data = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_reolm_export(path: Any) -> bool:
    """True for a directory written by ``ReoLM.save_pretrained`` (config.json model_type reolm)."""
    return _config_json(path).get("model_type") == "reolm"


def export_origin(path: Any) -> str | None:
    """Where an export's weights came from (``backbone`` for ``reolm export backbone``), if recorded."""
    return _config_json(path).get("origin")


def is_hf_backbone(path: Any) -> bool:
    """True for a plain HF checkpoint of an architecture Reo-LM loads (BERT, RoBERTa, MiniLM...)."""
    from reolm.model.hf_checkpoint import SUPPORTED_MODEL_TYPES

    return _config_json(path).get("model_type") in SUPPORTED_MODEL_TYPES


def resolve_saved_model(path: Any) -> tuple[Any, dict[str, Any]]:
    """(folder, descriptor) of a run directory, its ``best/``, any saved model folder, a bare
    Reo-LM export (``reolm-zeroshot``, or ``plm-zeroshot`` when made from a plain checkpoint) or
    a plain HF checkpoint (``plm-zeroshot``); the last three have no fine-tuning."""
    from pathlib import Path

    from reolm.eval.saved import read_descriptor, resolve_model_dir

    try:
        folder = resolve_model_dir(path)
    except FileNotFoundError as err:
        if is_reolm_export(path):
            plain = export_origin(path) == BACKBONE_ORIGIN
            return Path(path), {"model": PLM_ZEROSHOT if plain else "reolm-zeroshot",
                                "format_version": 1}
        if is_hf_backbone(path):
            return Path(path), {"model": PLM_ZEROSHOT, "format_version": 1}
        raise FileNotFoundError(f"{err}; nor is it a Reo-LM export or a BERT/RoBERTa checkpoint "
                                f"(config.json with model_type reolm or one of bert, roberta, ...)") from None
    return folder, read_descriptor(folder)


def load_recommender(path: Any) -> tuple[Any, dict[str, Any]]:
    """(model, descriptor) for a run directory, its ``best/``, any saved model folder or an export."""
    folder, desc = resolve_saved_model(path)
    return get_loader(desc["model"])(folder), desc
