"""Export a training checkpoint to an HF-style directory that fine-tuning loads.

``export_checkpoint(CKPT, OUT)`` consolidates the weights through DeepSpeed
(``get_fp32_state_dict_from_zero_checkpoint``: it reads the fp32 master weights from the
ZeRO optimizer partitions, so it works for ZeRO-1/2 and for ZeRO-3 where the parameters
themselves are sharded), rebuilds the model from the architecture recorded in the checkpoint
(``trainer_state.json``: backbone + model config), and writes ``config.json`` +
``model.safetensors`` + the tokenizer files the checkpoint holds (``tokenizer/``, written by
pre-training) via ``ReoLM.save_pretrained`` (temp folder, then rename).  It runs on one CPU
process; the training world size does not matter.

Only a checkpoint whose manifest verifies is exported, and nothing is unpickled: every ``.pt``
file is checked against the allow-list first and read weights-only (:mod:`reolm.train.safe_load`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from reolm.data.tables import VISION_FIELD, load_tokenizer
from reolm.train.checkpoint_files import STATE_FILE, TAG_RE, CheckpointError, newest_complete, verify_checkpoint
from reolm.train.safe_load import check_folder, weights_only_loads

__all__ = ["ExportError", "find_checkpoint", "load_checkpoint_model", "load_checkpoint_tokenizer",
           "export_checkpoint"]

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """The path is not a (complete) training checkpoint."""


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, a checkpoints/ folder (-> newest) or a run directory (-> its newest)."""
    path = Path(path)
    if path.name.endswith(".tmp"):
        raise ExportError(f"{path} is an unfinished checkpoint save (its .tmp name was never renamed)")
    if TAG_RE.match(path.name):
        reason = verify_checkpoint(path)
        if reason:
            raise ExportError(f"{path}: not a complete checkpoint ({reason})")
        return path
    for root in (path, path / "checkpoints"):
        try:
            found = newest_complete(root)  # reports newer incomplete ones by name
        except CheckpointError as err:
            raise ExportError(str(err)) from None
        if found is not None:
            return found
    raise ExportError(f"{path}: no complete checkpoint (expected a step-XXXXXXXX checkpoint folder, or a "
                      f"run/checkpoints directory holding them)")


def load_checkpoint_model(path: str | os.PathLike) -> Any:
    """The ReoLM of a checkpoint with its consolidated fp32 weights (CPU, eval mode)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from reolm.config import from_dict
    from reolm.model import ModelConfig, ReoLM
    from reolm.model.hf_checkpoint import TIED_KEY, BackboneConfig, load_complete_state

    ckpt = find_checkpoint(path)
    state = json.loads((ckpt / STATE_FILE).read_text())
    if "backbone" not in state or "model" not in state:
        raise ExportError(f"{ckpt / STATE_FILE}: no backbone/model architecture recorded")
    model = ReoLM(BackboneConfig.from_dict(state["backbone"]), from_dict(ModelConfig, state["model"]))
    check_folder(ckpt)
    with weights_only_loads():
        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    weights.pop(TIED_KEY, None)  # the decoder weight IS the word embedding table
    load_complete_state(model, weights, f"{ckpt}: consolidated weights do not match the recorded architecture",
                        error=ExportError)
    return model.eval()


def load_checkpoint_tokenizer(ckpt: Path) -> Any | None:
    """The tokenizer pre-training saved in the checkpoint folder ``ckpt`` (``tokenizer/``, next to
    the weights), None without one."""
    tokenizer_dir = ckpt / "tokenizer"
    return load_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else None


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the checkpoint at ``path`` as an HF-style directory ``out``; returns ``out``.

    ``config.json`` carries the checkpoint's vision identity (which vision model made the image
    features it was trained on), so fine-tuning can refuse features of another one.
    """
    ckpt = find_checkpoint(path)
    model, tokenizer = load_checkpoint_model(ckpt), load_checkpoint_tokenizer(ckpt)
    state = json.loads((ckpt / STATE_FILE).read_text())
    if VISION_FIELD not in state:
        log.warning("%s records no vision model (written by an older reolm); neither will the export",
                    ckpt / STATE_FILE)
        return model.save_pretrained(out, tokenizer)
    return model.save_pretrained(out, tokenizer, extra_config={VISION_FIELD: state[VISION_FIELD]})
