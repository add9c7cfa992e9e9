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

This module also owns Reo-LM's own exports (``ReoLM.save_pretrained`` / ``from_pretrained``:
``config.json`` with ``model_type: reolm`` + ``model.safetensors`` + tokenizer files, written as
one folder swapped in atomically) and the one strict key check, :func:`key_mismatch`, that
backbone loading, export loading and ``reolm export checkpoint`` share.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import AbstractSet, Any, Mapping

import torch
from torch import nn

from reolm.config import to_dict
from reolm.io import atomic_dir, read_json

__all__ = ["BackboneConfig", "CheckpointError", "read_backbone_config", "read_state_dict",
           "normalise_hf_keys", "has_untied_decoder", "SUPPORTED_MODEL_TYPES", "TIED_KEY", "FORMAT_VERSION",
           "key_mismatch", "backbone_keys", "load_backbone_weights", "load_complete_state", "weights_to_save",
           "save_export", "read_export_config"]

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
FORMAT_VERSION = 1  # of Reo-LM exports (config.json "format_version")
TIED_KEY = "lm_head.decoder.weight"  # shares the word embedding table; never stored
# Name fragments of the parameters Reo-LM adds to a BERT/RoBERTa encoder (no HF checkpoint has them).
REOLM_ADDITIONS = ("embeddings.item_position_embeddings.", "embeddings.image_mlp.", "embeddings.void_image",
                   ".adapter.", "lm_head.")

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
    data = read_json(path, CheckpointError)
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


# ----------------------------------------------------------------------------- the strict key check

def _names(keys: list[str], most: int = 10) -> str:
    return ", ".join(keys[:most]) + (" ..." if len(keys) > most else "")


def key_mismatch(found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor] | AbstractSet[str],
                 optional: AbstractSet[str] = frozenset()) -> str:
    """Why the weights ``found`` are not ``expected`` (plus any of ``optional``); '' when they are.

    Names the missing and the unexpected keys and, when ``expected`` maps names to tensors, the
    keys whose shapes differ (the first ten of each)."""
    names = expected.keys() if isinstance(expected, Mapping) else expected
    parts = []
    missing = sorted(names - found.keys())
    unexpected = sorted(found.keys() - names - optional)
    if missing:
        parts.append(f"missing keys: {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_names(unexpected)}")
    if isinstance(expected, Mapping):
        wrong = sorted(k for k in names & found.keys() if found[k].shape != expected[k].shape)
        if wrong:
            parts.append("wrong shapes: " + _names([f"{k} {tuple(found[k].shape)} (model "
                                                    f"{tuple(expected[k].shape)})" for k in wrong]))
    return "; ".join(parts)


# ----------------------------------------------------------------------------- HF backbones

def backbone_keys(model: nn.Module) -> set[str]:
    """Parameters every HF checkpoint must provide: the model's minus the Reo-LM additions."""
    return {k for k in model.state_dict() if not any(tag in k for tag in REOLM_ADDITIONS)}


def load_backbone_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load the raw weights of an HF BERT/RoBERTa checkpoint into a fresh Reo-LM ``model``.

    Keys are normalised (:func:`normalise_hf_keys`); every backbone key must be present and
    nothing unknown; the LM head is all there or absent (then it starts fresh).  The position
    table is extended when the model needs more rows, and every token-type row starts as the
    checkpoint's type-0 row, so the fresh model computes the checkpoint's encoder.
    """
    if has_untied_decoder(state):
        log.warning("%s: the MLM decoder weight differs from the word embeddings; Reo-LM ties them, "
                    "so the checkpoint's decoder weight is not used", source)
    state = normalise_hf_keys(state)
    own = model.state_dict()
    head_keys = {k for k in own if k.startswith("lm_head.") and k != TIED_KEY}
    problem = key_mismatch(state, backbone_keys(model), optional=head_keys)
    if problem:
        raise CheckpointError(f"{source}: weights do not match a {model.backbone_config.model_type} encoder "
                              f"({problem})")
    head_present = head_keys & state.keys()
    if head_present and head_present != head_keys:
        raise CheckpointError(f"{source}: incomplete LM head; has {sorted(head_present)}, "
                              f"needs {sorted(head_keys)}")
    with torch.no_grad():
        for key, value in state.items():
            target = own[key]
            if key == "embeddings.position_embeddings.weight":
                value = _extend_positions(value, target.shape[0], model, source)
            elif key == "embeddings.token_type_embeddings.weight":
                # The checkpoint has 1-2 types; ours start as its type-0 row so the PLM is unchanged.
                value = value[:1].expand_as(target)
            if value.shape != target.shape:
                raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, "
                                      f"expected {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))
    if not head_present:
        # Plain encoders (sentence-transformers, *Model checkpoints) ship no MLM head: the MLM loss
        # of pre-training and stage 1 then starts from a random transform; say so loudly.
        log.warning("%s has no MLM head: the LM head starts fresh (random transform, zero bias; it "
                    "only matters for the MLM loss of training)", source)


def _extend_positions(table: torch.Tensor, rows: int, model: nn.Module, source: str) -> torch.Tensor:
    """Tile the checkpoint's learned position rows (after the RoBERTa offset) up to ``rows``."""
    if table.shape[0] >= rows:
        return table[:rows]
    offset = model.backbone_config.position_offset
    learned = table[offset:]
    if learned.shape[0] == 0:
        raise CheckpointError(f"{source}: position table has no learned rows to extend")
    reps = math.ceil((rows - offset) / learned.shape[0])
    # Positions past the checkpoint's were never trained: copies only give them a start.
    log.warning("%s: model.max_tokens=%d needs %d position rows but the checkpoint has %d; rows past "
                "them are copies of its learned rows (set model.max_tokens=%d to stay within the "
                "trained positions, see docs/model.md)", source, model.config.max_tokens, rows,
                table.shape[0], table.shape[0] - offset)
    return torch.cat([table[:offset], learned.repeat(reps, 1)[: rows - offset]])


# ----------------------------------------------------------------------------- Reo-LM exports

def load_complete_state(model: nn.Module, state: Mapping[str, torch.Tensor], where: str,
                        error: type[Exception] = CheckpointError) -> None:
    """Load ``state`` into ``model`` when it holds exactly the model's weights (the tied decoder
    weight excepted) with their shapes; otherwise raise ``error`` saying ``where`` and what differs."""
    expected = {k: v for k, v in model.state_dict().items() if k != TIED_KEY}
    problem = key_mismatch(state, expected)
    if problem:
        raise error(f"{where} ({problem})")
    model.load_state_dict(state, strict=False)  # keys verified above; the tied key is implied


def weights_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """All weights once (the tied decoder weight is the word embedding table), on CPU."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED_KEY}


def save_export(model: nn.Module, directory: str | os.PathLike, tokenizer: Any | None,
                extra_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` + ``tokenizer``'s files as one folder swapped in
    atomically; ``extra_config`` adds top-level config.json entries that loading ignores."""
    from safetensors.torch import save_file

    directory = Path(directory)
    config = {"model_type": "reolm", "format_version": FORMAT_VERSION, "architectures": ["ReoLM"],
              "backbone": model.backbone_config.to_dict(), "reolm": to_dict(model.config),
              **dict(extra_config or {})}
    with atomic_dir(directory) as tmp:
        # Inside the temporary folder: the folder's rename makes every file appear at once.
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(weights_to_save(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        else:
            log.warning("no tokenizer given; %s will hold no tokenizer files", directory)
    return directory


def read_export_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a Reo-LM export (``backbone`` and ``reolm`` sections), checked."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    data = read_json(path, CheckpointError)
    if data.get("model_type") != "reolm":
        raise CheckpointError(f"{path}: not a Reo-LM export (model_type={data.get('model_type')!r}); "
                              f"use ReoLM.from_backbone for a plain HF checkpoint")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {data['format_version']} is newer than this code "
                              f"({FORMAT_VERSION})")
    return data


