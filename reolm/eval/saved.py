"""The self-describing saved-model folder (``RUN_DIR/best/``) that evaluation loads.

::

    best/recommender.json   {"format_version": 1, "model": "sasrec", "num_items": N,
                             "domain": "Scientific", "model_config": {...section...},
                             "epoch": 12, "val": {...metrics...}}
    best/model.safetensors  the model's state dict
    best/config.yaml        the run's full resolved config

``model`` names the loader in :data:`reolm.finetune.registry.LOADERS`; a model kind that
needs other files (Reo-LM: an HF-style export) keeps them in the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from reolm.io import atomic_path, write_json

__all__ = ["DESCRIPTOR", "WEIGHTS", "save_recommender", "read_descriptor", "load_weights", "resolve_model_dir"]

DESCRIPTOR = "recommender.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def save_recommender(folder: str | Path, model: nn.Module, *, model_name: str, num_items: int, domain: str,
                     model_config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write weights then the descriptor (last, so a folder with a descriptor is complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = folder / DESCRIPTOR
    if descriptor.exists():
        descriptor.unlink()  # incomplete until rewritten below
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(descriptor, {"format_version": FORMAT_VERSION, "model": model_name, "num_items": int(num_items),
                            "domain": domain, "model_config": dict(model_config or {}), **dict(extra or {})},
               indent=2)
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
    try:
        desc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (not a saved model folder)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON at line {err.lineno}: {err.msg}") from None
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


def state_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the state dict (to restore the best weights later)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
