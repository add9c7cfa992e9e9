"""Reading local Hugging Face BERT/RoBERTa checkpoint directories with a strict key check.

Our parameter names are the ``BertModel``/``RobertaModel`` names, so a
checkpoint maps onto the encoder after three normalisations:

* the ``bert.`` / ``roberta.`` prefix of ``*ForMaskedLM`` / ``*ForPreTraining``
  checkpoints is stripped;
* the BERT LM head (``cls.predictions.*``) is renamed to our RoBERTa-style
  ``lm_head.*``; the decoder weight is tied to the word embeddings, so it and
  the duplicated decoder bias are not loaded;
* very old ``gamma``/``beta`` LayerNorm names become ``weight``/``bias``.

Keys that carry nothing we use (the pooler, the next-sentence head, position
id buffers) are dropped.  Anything else unexpected, or any backbone weight
missing, raises :class:`CheckpointError` naming the directory and the keys.
"""

from __future__ import annotations

import json
import pickle
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["BackboneConfig", "CheckpointError", "read_backbone_config", "read_state_dict",
           "normalise_hf_keys", "has_untied_decoder", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")

# Keys of HF checkpoints that hold nothing the Reo-LM encoder uses.
_IGNORED = (
    re.compile(r"^pooler\."),
    re.compile(r"^cls\.seq_relationship\."),
    re.compile(r"^embeddings\.position_ids$"),
    re.compile(r"^embeddings\.token_type_ids$"),
    re.compile(r"^lm_head\.decoder\.(weight|bias)$"),   # tied to word embeddings / = lm_head.bias
)
_RENAMES = (
    (re.compile(r"^cls\.predictions\.transform\.dense\."), "lm_head.dense."),
    (re.compile(r"^cls\.predictions\.transform\.LayerNorm\."), "lm_head.layer_norm."),
    (re.compile(r"^cls\.predictions\.bias$"), "lm_head.bias"),
    (re.compile(r"^cls\.predictions\.decoder\.weight$"), "lm_head.decoder.weight"),
    (re.compile(r"^cls\.predictions\.decoder\.bias$"), "lm_head.decoder.bias"),
    (re.compile(r"\.gamma$"), ".weight"),
    (re.compile(r"\.beta$"), ".bias"),
)
_PREFIXES = ("bert.", "roberta.")


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or its weights do not match the architecture."""


@dataclass
class BackboneConfig:
    """The architecture fields of a BERT/RoBERTa ``config.json`` that the encoder needs."""

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0

    @property
    def position_offset(self) -> int:
        """RoBERTa-family position ids start after the padding index; BERT's start at 0."""
        return self.pad_token_id + 1 if self.model_type != "bert" else 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BackboneConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def read_backbone_config(directory: str | os.PathLike) -> BackboneConfig:
    """Parse ``config.json`` of a BERT/RoBERTa-architecture checkpoint directory."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from None
    model_type = data.get("model_type", "bert")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a BERT/RoBERTa architecture "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    cfg = BackboneConfig.from_dict(data)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise CheckpointError(f"{path}: hidden_size {cfg.hidden_size} is not a multiple of "
                              f"num_attention_heads {cfg.num_attention_heads}")
    return cfg


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights of ``model.safetensors`` (preferred) or ``pytorch_model.bin`` (``weights_only``)."""
    directory = Path(directory)
    safetensors_path = directory / "model.safetensors"
    bin_path = directory / "pytorch_model.bin"
    if safetensors_path.is_file():
        from safetensors.torch import load_file
        return load_file(str(safetensors_path))
    if bin_path.is_file():
        return _load_bin(bin_path)
    if (directory / "model.safetensors.index.json").is_file() or (directory / "pytorch_model.bin.index.json").is_file():
        raise CheckpointError(f"{directory}: sharded checkpoints are not supported; re-save the model "
                              f"as one file (save_pretrained(..., max_shard_size='100GB'))")
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` read weights-only; a pickle that needs more is refused in plain words."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            needs = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (ValueError, RuntimeError, pickle.UnpicklingError):
            needs = []
        what = f"it needs {needs[0]}" if needs else "it is not a plain tensor archive"
        raise CheckpointError(f"{path}: refused: {what}, and loading it could run arbitrary code (only "
                              f"tensors are loaded from .bin files). Convert it to model.safetensors "
                              f"with a tool you trust.") from None


def has_untied_decoder(state: Mapping[str, torch.Tensor]) -> bool:
    """True when the checkpoint's MLM decoder weight differs from its word embeddings (we tie them)."""
    words = decoder = None
    for key, value in state.items():
        if key.endswith("embeddings.word_embeddings.weight"):
            words = value
        elif key.endswith(("lm_head.decoder.weight", "cls.predictions.decoder.weight")):
            decoder = value
    return words is not None and decoder is not None and not torch.equal(words, decoder)


def normalise_hf_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HF ``Bert*``/``Roberta*`` key names onto ours and drop keys we do not use."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        for pattern, repl in _RENAMES:
            name = pattern.sub(repl, name)
        if any(p.search(name) for p in _IGNORED):
            continue
        out[name] = value
    return out
