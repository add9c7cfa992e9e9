"""The saved-model folder (``RUN_DIR/best/``) and the exports evaluation also loads.

::

    best/recommender.json   {"format_version": 1, "model": "sasrec", "num_items": N,
                             "domain": "Scientific", "model_config": {...section...},
                             "epoch": 12, "val": {...metrics...}}
    best/model.safetensors  the model's state dict
    best/config.yaml        the run's full resolved config

``model`` names the kind (:mod:`reolm.saved.kinds`) whose loader reads the folder; a kind that
needs other files keeps them in the same folder: Reo-LM an HF-style export (``config.json``,
tokenizer) and per-item row files (:func:`save_item_rows`) that the descriptor names.

A folder without a descriptor may still be a model: a Reo-LM export (``config.json`` with
``model_type: reolm``; ``origin: backbone`` when ``reolm export backbone`` made it from a plain
checkpoint) or a plain HF BERT/RoBERTa checkpoint (:func:`is_hf_backbone`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from reolm.io import atomic_path, read_json, write_json

__all__ = ["DESCRIPTOR", "WEIGHTS", "FORMAT_VERSION", "BACKBONE_ORIGIN", "descriptor", "save_recommender",
           "read_descriptor", "load_weights", "resolve_model_dir", "save_item_rows", "load_item_rows",
           "check_item_rows", "is_reolm_export", "export_origin", "is_hf_backbone"]

DESCRIPTOR = "recommender.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
BACKBONE_ORIGIN = "backbone"  # config.json "origin" of an export made from a plain checkpoint


def descriptor(model_name: str, num_items: int, domain: str, model_config: Mapping[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``recommender.json`` document of a saved model."""
    return {"format_version": FORMAT_VERSION, "model": model_name, "num_items": int(num_items), "domain": domain,
            "model_config": dict(model_config or {}), **dict(extra or {})}


def save_recommender(folder: str | Path, model: nn.Module, *, model_name: str, num_items: int, domain: str,
                     model_config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write weights then the descriptor (last, so a folder with a descriptor is complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DESCRIPTOR
    if path.exists():
        path.unlink()  # incomplete until rewritten below
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(path, descriptor(model_name, num_items, domain, model_config, extra), indent=2)
    return folder


def resolve_model_dir(path: str | Path) -> Path:
    """``RUN_DIR`` -> ``RUN_DIR/best``; a folder holding a descriptor is returned as is."""
    path = Path(path)
    if (path / DESCRIPTOR).is_file():
        return path
    if (path / "best" / DESCRIPTOR).is_file():
        return path / "best"
    raise FileNotFoundError(f"{path}: no {DESCRIPTOR} here nor in {path / 'best'} "
                            f"(expected a run directory or its best/ folder)")


def read_descriptor(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / DESCRIPTOR
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a saved model folder)")
    desc = read_json(path)
    for key in ("model", "num_items"):
        if key not in desc:
            raise ValueError(f"{path}: missing key {key!r}")
    if desc.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {desc['format_version']} is newer than this reolm understands")
    return desc


def load_weights(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load ``model.safetensors`` into ``model`` with a strict key check."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing weights")
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model


# ----------------------------------------------------------------------------- per-item rows

def save_item_rows(path: Path, key: str, rows: torch.Tensor | None) -> str | None:
    """Save ``rows`` as tensor ``key`` of ``path``; returns the file name for the descriptor (None: nothing)."""
    if rows is None:
        return None
    save_file({key: rows.detach().float().contiguous().cpu()}, str(path))
    return path.name


def load_item_rows(folder: Path, desc: Mapping[str, Any], key: str, rows: int, width: int) -> torch.Tensor | None:
    """Tensor ``key`` [rows, width] of the file the descriptor names under ``key`` (None when it names none)."""
    if not desc.get(key):
        return None
    name = str(desc[key])
    if Path(name).name != name:  # a plain file name: a descriptor must not point outside its folder
        raise ValueError(f"{folder / DESCRIPTOR}: {key!r} must name a file in the folder, got {name!r}")
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (named by {folder / DESCRIPTOR} {key!r})")
    tensors = load_file(str(path))
    if key not in tensors:
        raise ValueError(f"{path}: no tensor {key!r} (has {sorted(tensors)})")
    tensor = tensors[key]
    if tuple(tensor.shape) != (rows, width) or not tensor.is_floating_point():
        raise ValueError(f"{path}: {key!r} is {tensor.dtype} {tuple(tensor.shape)}, expected floating "
                         f"({rows}, {width}): num_items {rows} of {folder / DESCRIPTOR}, hidden size {width}")
    return tensor.float()


def check_item_rows(rows: Mapping[str, torch.Tensor | None], domain: Any, where: str) -> None:
    """Refuse per-item tensors (item table, ID rows) whose row count is not the domain's item count."""
    for name, tensor in rows.items():
        if tensor is not None and tensor.shape[0] != domain.num_items:
            raise ValueError(f"{where} {name} has {tensor.shape[0]} rows but domain {domain.name!r} has "
                             f"{domain.num_items} items: wrong domain?")


# ----------------------------------------------------------------------------- exports and HF checkpoints

def _config_json(path: Any) -> dict[str, Any]:
    """A directory's config.json, or {} when it has none or it is unreadable."""
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
