"""The Reo-LM encoder: a BERT/RoBERTa-compatible post-LN transformer over packed token streams,
with image tokens, item positions and a mixture of adapters in every layer.

Parameter names follow ``BertModel``/``RobertaModel`` (``embeddings.*``,
``encoder.layer.N.*``) plus our additions (``embeddings.item_position_embeddings``,
``embeddings.image_mlp``, ``embeddings.void_image``, ``encoder.layer.N.adapter.*``,
``lm_head.*``), so HF checkpoints load under a strict key check (see
:mod:`reolm.model.hf_checkpoint`).

A fresh model computes exactly the pre-trained LM: the adapters' up-projections
start at zero, the item-position table starts at zero and every token-type row
starts as the checkpoint's type-0 row, so new inputs only start to matter as
training moves those parameters.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from reolm.config import from_dict, to_dict
from reolm.model.attention import AttentionLayout, BACKENDS, compute_dtype, resolve_backend
from reolm.model.config import TOP_ROUTINGS, ModelConfig
from reolm.model.hf_checkpoint import (BackboneConfig, CheckpointError, has_untied_decoder, normalise_hf_keys,
                                       read_backbone_config, read_state_dict)

__all__ = ["ReoLM", "EncoderOutput", "MixtureOfAdapters", "FORMAT_VERSION", "training_flops"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
TIED_KEY = "lm_head.decoder.weight"  # shares the word embedding table; never stored

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise CheckpointError(f"unsupported activation {name!r} (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


# ----------------------------------------------------------------------------- embeddings

class Embeddings(nn.Module):
    """word-or-image + position + token type + item position, then LayerNorm and dropout."""

    def __init__(self, bb: BackboneConfig, cfg: ModelConfig, num_positions: int, dropout: float):
        super().__init__()
        h = bb.hidden_size
        self.word_embeddings = nn.Embedding(bb.vocab_size, h, padding_idx=bb.pad_token_id)
        self.position_embeddings = nn.Embedding(num_positions, h)
        self.token_type_embeddings = nn.Embedding(cfg.num_token_types, h)
        self.item_position_embeddings = nn.Embedding(cfg.max_items + 1, h)
        # The image token's embedding: MLP of the item's image feature (d -> 2d -> H).
        d = cfg.image_feature_dim
        self.image_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, h))
        self.void_image = nn.Parameter(torch.zeros(h))  # items without an image
        self.LayerNorm = nn.LayerNorm(h, eps=bb.layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.position_offset = bb.position_offset

    def image_embeddings(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        mlp_out = self.image_mlp(features.to(self.void_image.dtype))
        return torch.where(present[:, None], mlp_out, self.void_image.expand_as(mlp_out))

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        x = self.word_embeddings(batch["input_ids"])
        slots = batch["image_token_index"]
        if slots.shape[0]:
            images = self.image_embeddings(batch["image_features"], batch["image_present"])
            x = x.index_put((slots,), images.to(x.dtype))  # out of place: autograd-safe
        x = (x + self.position_embeddings(batch["position_ids"] + self.position_offset)
             + self.token_type_embeddings(batch["token_type_ids"])
             + self.item_position_embeddings(batch["item_position_ids"]))
        return self.dropout(self.LayerNorm(x))


# ----------------------------------------------------------------------------- adapters

class MixtureOfAdapters(nn.Module):
    """A adapters of rank r sharing one down-projection; the routing mode weighs their outputs.

    ``out = scale * sum_a w_a * up_a(act(down(x))_a)`` where the per-token weights
    ``w`` are 1/A (``mean``), one-hot of the sequence's domain (``domain``) or a
    softmax gate (``gate``).  All modes run the same two matmuls (the ``A*r``
    activations are weighted before one ``[A*r, H]`` up-projection), so there
    is no data-dependent control flow and no host sync.
    """

    MODES = ("mean", "domain", "gate")

    def __init__(self, hidden: int, num_adapters: int, rank: int, scale: float, activation: str):
        super().__init__()
        self.num_adapters, self.rank, self.scale = num_adapters, rank, scale
        self.down = nn.Linear(hidden, num_adapters * rank)
        self.up_weight = nn.Parameter(torch.zeros(num_adapters, rank, hidden))
        self.up_bias = nn.Parameter(torch.zeros(num_adapters, hidden))
        self.gate = nn.Linear(hidden, num_adapters)
        self.act = _activation(activation)

    def routing_weights(self, x: torch.Tensor, mode: str, token_domains: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """Per-token adapter weights ``[T, A]`` (rows sum to one for a routable token)."""
        adapters = torch.arange(self.num_adapters, device=x.device)
        if mode == "mean":
            return x.new_full((x.shape[0], self.num_adapters), 1.0 / self.num_adapters)
        if mode == "domain":
            if token_domains is None:
                raise ValueError("domain routing needs the batch's seq_domains")
            return (token_domains[:, None] == adapters[None, :]).to(x.dtype)
        if mode == "gate":
            return torch.softmax(self.gate(x).float(), dim=-1).to(x.dtype)
        raise ValueError(f"unknown routing mode {mode!r}; choose from {', '.join(self.MODES)}")

    def forward(self, x: torch.Tensor, mode: str, token_domains: torch.Tensor | None = None
                ) -> torch.Tensor:
        w = self.routing_weights(x, mode, token_domains)                         # [T, A]
        z = self.act(self.down(x)).view(-1, self.num_adapters, self.rank)       # [T, A, r]
        z = (z * w[:, :, None]).flatten(1)                                        # [T, A*r]
        up = self.up_weight.reshape(self.num_adapters * self.rank, -1)
        return self.scale * (z @ up + w @ self.up_bias)


# ----------------------------------------------------------------------------- transformer layer

class SelfAttention(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)


class DenseResidualNorm(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)`` — BERT's post-LN sub-layer output."""

    def __init__(self, d_in: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, extra: torch.Tensor | None = None
                ) -> torch.Tensor:
        y = self.dropout(self.dense(x)) + residual
        if extra is not None:
            y = y + extra
        return self.LayerNorm(y)


class AttentionBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float, dropout: float):
        super().__init__()
        self.self = SelfAttention(hidden)
        self.output = DenseResidualNorm(hidden, hidden, eps, dropout)
        self.heads = heads


class Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int, act: str):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    """Post-LN BERT layer; the adapter runs parallel to the FFN and adds to its output."""

    def __init__(self, bb: BackboneConfig, cfg: ModelConfig, hidden_dropout: float, attn_dropout: float,
                 routing: str):
        super().__init__()
        h = bb.hidden_size
        self.attention = AttentionBlock(h, bb.num_attention_heads, bb.layer_norm_eps, hidden_dropout)
        self.intermediate = Intermediate(h, bb.intermediate_size, bb.hidden_act)
        self.output = DenseResidualNorm(bb.intermediate_size, h, bb.layer_norm_eps, hidden_dropout)
        self.adapter = MixtureOfAdapters(h, cfg.num_adapters, cfg.adapter_rank, cfg.adapter_scale,
                                         cfg.adapter_activation)
        self.routing = routing
        self.attn_dropout = attn_dropout

    def forward(self, x: torch.Tensor, layout: AttentionLayout, backend: str,
                token_domains: torch.Tensor | None) -> torch.Tensor:
        proj = self.attention.self
        heads = self.attention.heads
        shape = (x.shape[0], heads, x.shape[1] // heads)
        # Separate module calls (not one fused matmul): ZeRO-3 gathers weights per module forward.
        q, k, v = (p(x).view(shape) for p in (proj.query, proj.key, proj.value))
        ctx = BACKENDS[backend](q, k, v, layout, self.attn_dropout, self.training)
        return self._feed_forward(self.attention.output(ctx.reshape(x.shape), x), token_domains)

    def forward_cls(self, x: torch.Tensor, layout: AttentionLayout, backend: str,
                    token_domains: torch.Tensor | None) -> torch.Tensor:
        """The layer's output at the first token of every sequence only, ``[B, H]`` in stream order.

        Keys and values still come from every token; the query, the attention output, the
        adapter and the feed-forward run on the B [CLS] rows alone.  Equal to
        ``forward(...)[cls rows]`` up to float summation order.
        """
        proj = self.attention.self
        heads = self.attention.heads
        rows = layout.cu_seqlens[:-1].long()
        cls = x.index_select(0, rows)
        q = proj.query(cls).view(cls.shape[0], heads, -1)
        k, v = (p(x).view(x.shape[0], heads, -1) for p in (proj.key, proj.value))
        ctx = BACKENDS[backend](q, k, v, layout, self.attn_dropout, self.training, cls_only=True)
        domains = token_domains.index_select(0, rows) if token_domains is not None else None
        return self._feed_forward(self.attention.output(ctx.reshape(cls.shape), cls), domains)

    def _feed_forward(self, h: torch.Tensor, token_domains: torch.Tensor | None) -> torch.Tensor:
        adapter = self.adapter(h, self.routing, token_domains)
        return self.output(self.intermediate(h), h, adapter)


# ----------------------------------------------------------------------------- LM head

class LMHead(nn.Module):
    """RoBERTa-style MLM head: dense, act, LayerNorm, then ``decoder`` whose weight IS the word
    embedding table (tied as in HF, so ZeRO-3 gathers it through the decoder module)."""

    def __init__(self, bb: BackboneConfig, word_embeddings: nn.Embedding):
        super().__init__()
        h = bb.hidden_size
        self.dense = nn.Linear(h, h)
        self.layer_norm = nn.LayerNorm(h, eps=bb.layer_norm_eps)
        self.decoder = nn.Linear(h, bb.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(bb.vocab_size))
        self.act = _activation(bb.hidden_act if bb.model_type == "bert" else "gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(self.act(self.dense(x)))) + self.bias


# ----------------------------------------------------------------------------- model

@dataclass
class EncoderOutput:
    """``hidden`` [T, H] last layer (None from ``forward(pooled_only=True)`` with a [CLS]-only last
    layer), ``pooled`` [B, H] sequence vectors, ``mlm_hidden`` [T, H] the output of the last
    bottom layer (what the MLM head reads)."""

    hidden: torch.Tensor | None
    pooled: torch.Tensor
    mlm_hidden: torch.Tensor


class Encoder(nn.Module):
    def __init__(self, layers: list[Layer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)



def training_flops(backbone_config: Any, config: ModelConfig, num_real_tokens: int, num_attention_pairs: int,
                   num_mlm_positions: int = 0, cls_only_sequences: int | None = None) -> float:
    """Model FLOPs of one forward + backward (3x forward) of Reo-LM over the given token counts.

    ``backbone_config`` is the HF config (hidden_size, intermediate_size, num_hidden_layers,
    vocab_size); ``num_attention_pairs`` is the sum over sequences of (tokens of the sequence)^2.
    Matmuls only: linear layers, adapters, attention scores and mixing, the MLM head at the masked
    positions.  ``cls_only_sequences`` counts a last layer run for the [CLS] rows of that many
    sequences only (keys and values still projected for every token), as ``forward(batch,
    pooled_only=True)`` does.  A function of plain numbers, so a run's cost can be estimated
    before any data exists.
    """
    h = backbone_config.hidden_size
    rest = 2 * h * h + 2 * h * backbone_config.intermediate_size + 2 * h * config.num_adapters * config.adapter_rank
    per_token = 2 * h * h + rest                                     # q, k, v, output, FFN, adapters
    tokens, pairs = num_real_tokens, num_attention_pairs
    forward = backbone_config.num_hidden_layers * (2 * per_token * tokens + 4 * h * pairs)
    if cls_only_sequences is not None:
        forward -= 2 * per_token * tokens + 4 * h * pairs            # the full last layer, replaced by
        forward += 2 * (2 * h * h * tokens + rest * cls_only_sequences) + 4 * h * tokens  # its [CLS] rows
    forward += 2 * num_mlm_positions * (h * h + h * backbone_config.vocab_size)
    return 3.0 * forward


class ReoLM(nn.Module):
    """Reo-LM encoder over packed batches (see ``docs/model.md`` for the batch fields).

    Build with :meth:`from_backbone` (a plain HF BERT/RoBERTa directory) or
    :meth:`from_pretrained` (a directory written by :meth:`save_pretrained`).
    """

    def __init__(self, backbone: BackboneConfig, cfg: ModelConfig):
        super().__init__()
        self.backbone_config = backbone
        self.config = cfg
        self.tokenizer: Any = None
        hidden_dropout = backbone.hidden_dropout_prob if cfg.hidden_dropout is None else cfg.hidden_dropout
        attn_dropout = (backbone.attention_probs_dropout_prob if cfg.attention_dropout is None
                        else cfg.attention_dropout)
        self.embeddings = Embeddings(backbone, cfg, self.num_position_rows(backbone, cfg), hidden_dropout)
        n = backbone.num_hidden_layers
        self.num_bottom_layers = n // 2
        layers = [Layer(backbone, cfg, hidden_dropout, attn_dropout,
                        "mean" if i < self.num_bottom_layers else cfg.top_routing) for i in range(n)]
        self.encoder = Encoder(layers)
        self.lm_head = LMHead(backbone, self.embeddings.word_embeddings)
        self.gradient_checkpointing = bool(cfg.gradient_checkpointing)  # null (automatic) = off until resolved
        self._backend_cache: dict[str, str] = {}
        self.attention_dropout = attn_dropout
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def num_position_rows(bb: BackboneConfig, cfg: ModelConfig) -> int:
        needed = cfg.max_position_embeddings or cfg.max_tokens
        return max(bb.max_position_embeddings, needed + bb.position_offset)

    def reset_parameters(self) -> None:
        """BERT initialisation for everything; then the exact-PLM starting points."""
        std = self.backbone_config.initializer_range
        for module in self.modules():
            if module is self.lm_head.decoder:
                continue  # its weight is the word embedding table, initialised as an embedding
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    nn.init.zeros_(module.weight[module.padding_idx])
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            nn.init.normal_(self.embeddings.void_image, std=std)
            nn.init.zeros_(self.embeddings.item_position_embeddings.weight)
            types = self.embeddings.token_type_embeddings.weight
            types.copy_(types[0].clone().expand_as(types))
            for layer in self.encoder.layer:
                nn.init.zeros_(layer.adapter.up_weight)
                nn.init.zeros_(layer.adapter.up_bias)
            nn.init.zeros_(self.lm_head.bias)

    @classmethod
    def from_backbone(cls, hf_dir: str | os.PathLike, cfg: ModelConfig | None = None,
                      load_tokenizer: bool = True) -> "ReoLM":
        """A fresh Reo-LM on top of a plain HF BERT/RoBERTa checkpoint directory (strict key check)."""
        cfg = dataclasses.replace(cfg or ModelConfig(), backbone=str(hf_dir))
        bb = read_backbone_config(hf_dir)
        model = cls(bb, cfg)
        state = read_state_dict(hf_dir)
        if has_untied_decoder(state):
            log.warning("%s: the MLM decoder weight differs from the word embeddings; Reo-LM ties them, "
                        "so the checkpoint's decoder weight is not used", hf_dir)
        model.load_backbone_state(normalise_hf_keys(state), source=str(hf_dir))
        if load_tokenizer:
            model.tokenizer = _load_tokenizer(hf_dir)
        return model

    def _backbone_keys(self) -> set[str]:
        """Parameters every HF checkpoint must provide (ours minus the Reo-LM additions)."""
        ours = ("embeddings.item_position_embeddings.", "embeddings.image_mlp.", "embeddings.void_image",
                ".adapter.", "lm_head.")
        return {k for k in self.state_dict() if not any(tag in k for tag in ours)}

    def state_dict_to_save(self) -> dict[str, torch.Tensor]:
        """All weights once (the tied decoder weight is the word embedding table), on CPU."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k != TIED_KEY}

    def load_backbone_state(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load normalised HF weights; every backbone key must be present and nothing unknown."""
        own = self.state_dict()
        required = self._backbone_keys()
        head_keys = {k for k in own if k.startswith("lm_head.") and k != TIED_KEY}
        missing = sorted(required - state.keys())
        unexpected = sorted(state.keys() - required - head_keys)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
            if unexpected:
                parts.append(f"unexpected keys: {', '.join(unexpected[:10])}"
                             + (" ..." if len(unexpected) > 10 else ""))
            raise CheckpointError(f"{source}: weights do not match a {self.backbone_config.model_type} encoder "
                                  f"({'; '.join(parts)})")
        head_present = head_keys & state.keys()
        if head_present and head_present != head_keys:
            raise CheckpointError(f"{source}: incomplete LM head; has {sorted(head_present)}, "
                                  f"needs {sorted(head_keys)}")
        with torch.no_grad():
            for key, value in state.items():
                target = own[key]
                if key == "embeddings.position_embeddings.weight":
                    value = self._extend_positions(value, target.shape[0], source)
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

    def _extend_positions(self, table: torch.Tensor, rows: int, source: str) -> torch.Tensor:
        """Tile the checkpoint's learned position rows (after the RoBERTa offset) up to ``rows``."""
        if table.shape[0] >= rows:
            return table[:rows]
        offset = self.backbone_config.position_offset
        learned = table[offset:]
        if learned.shape[0] == 0:
            raise CheckpointError(f"{source}: position table has no learned rows to extend")
        reps = math.ceil((rows - offset) / learned.shape[0])
        # Positions past the checkpoint's were never trained: copies only give them a start.
        log.warning("%s: model.max_tokens=%d needs %d position rows but the checkpoint has %d; rows past "
                    "them are copies of its learned rows (set model.max_tokens=%d to stay within the "
                    "trained positions, see docs/model.md)", source, self.config.max_tokens, rows,
                    table.shape[0], table.shape[0] - offset)
        return torch.cat([table[:offset], learned.repeat(reps, 1)[: rows - offset]])

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | os.PathLike, extra_config: Mapping[str, Any] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` + tokenizer files (temp folder, then rename).

        ``extra_config`` adds top-level entries to config.json (e.g. ``origin``: where the weights
        came from), which :meth:`from_pretrained` ignores."""
        from safetensors.torch import save_file
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        config = {"model_type": "reolm", "format_version": FORMAT_VERSION, "architectures": ["ReoLM"],
                  "backbone": self.backbone_config.to_dict(), "reolm": to_dict(self.config),
                  **dict(extra_config or {})}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(self.state_dict_to_save(), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(tmp))
        else:
            log.warning("no tokenizer attached; %s will hold no tokenizer files", directory)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
                        load_tokenizer: bool = True) -> "ReoLM":
        """Load a directory written by :meth:`save_pretrained` (all keys must match exactly).

        ``overrides`` replaces run-time settings such as ``attention``, ``top_routing`` or
        ``gradient_checkpointing``; shape-changing settings come from the directory.
        """
        directory = Path(directory)
        path = directory / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{directory}: no config.json")
        data = json.loads(path.read_text())
        if data.get("model_type") != "reolm":
            raise CheckpointError(f"{path}: not a Reo-LM export (model_type={data.get('model_type')!r}); "
                                  f"use ReoLM.from_backbone for a plain HF checkpoint")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {data['format_version']} is newer than this code "
                                  f"({FORMAT_VERSION})")
        cfg = from_dict(ModelConfig, {**data["reolm"], **dict(overrides or {})})
        model = cls(BackboneConfig.from_dict(data["backbone"]), cfg)
        state = read_state_dict(directory)
        own = model.state_dict()
        own.pop(TIED_KEY)
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise CheckpointError(f"{directory}: weights do not match its config.json (missing keys: "
                                  f"{missing[:10]}; unexpected keys: {unexpected[:10]}; wrong shapes: "
                                  f"{wrong[:10]})")
        model.load_state_dict(state, strict=False)  # keys verified above; the tied key is implied
        if load_tokenizer:
            model.tokenizer = _load_tokenizer(directory)
        return model

    # ------------------------------------------------------------------ routing / backend
    def set_routing(self, mode: str) -> None:
        """Routing of the top half: ``domain`` (pre-training), ``gate`` (fine-tuning) or ``mean``
        (zero-shot on a new domain: no adapter of its own and an untrained gate)."""
        if mode not in TOP_ROUTINGS:
            raise ValueError(f"top routing must be one of {TOP_ROUTINGS}, got {mode!r}")
        self.config = dataclasses.replace(self.config, top_routing=mode)
        for layer in self.encoder.layer[self.num_bottom_layers:]:
            layer.routing = mode

    def set_attention(self, backend: str) -> None:
        """Switch the attention backend (``auto``, ``eager``, ``sdpa``, ``varlen``, ``flash``)."""
        resolve_backend(backend, "cuda" if backend in ("varlen", "flash") else "cpu")  # validates the name
        self._backend_cache.clear()
        self.config = dataclasses.replace(self.config, attention=backend)

    def attention_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        """The backend this forward uses (``auto`` resolved for the device and dtype, cached)."""
        key = f"{self.config.attention}@{device.type}/{dtype}"
        if key not in self._backend_cache:
            backend = resolve_backend(self.config.attention, device, dtype)
            if backend == "varlen" and self.attention_dropout > 0:
                log.warning("the varlen attention backend has no attention dropout; attention_dropout=%s "
                            "is not applied (use flash or sdpa to keep it)", self.attention_dropout)
            self._backend_cache[key] = backend
        return self._backend_cache[key]

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Mapping[str, Any], pooled_only: bool = False) -> EncoderOutput:
        """Encode a packed (or padded) batch; see docs/model.md for its fields.

        ``pooled_only``: the caller reads ``pooled`` and ``mlm_hidden`` only, so with [CLS]
        pooling (and ``cls_only_last_layer``) the last layer runs on the [CLS] rows alone and
        ``hidden`` is None.
        """
        layout = AttentionLayout.from_batch(batch)
        device = batch["input_ids"].device
        backend = self.attention_backend(device, compute_dtype(device, self.embeddings.LayerNorm.weight.dtype))
        token_domains = None
        if self.config.top_routing == "domain":
            token_domains = batch["seq_domains"].index_select(0, batch["token_seq_index"])
        cls_last = pooled_only and self.cls_only_last_layer
        layers = self.encoder.layer
        x = self.embeddings(batch)
        mlm_hidden = x
        for i, layer in enumerate(layers[:-1] if cls_last else layers):
            x = self._run_layer(layer.forward, x, layout, backend, token_domains)
            if i == self.num_bottom_layers - 1:
                mlm_hidden = x
        if not cls_last:
            return EncoderOutput(hidden=x, pooled=self.pool(x, batch, layout), mlm_hidden=mlm_hidden)
        cls = self._run_layer(layers[-1].forward_cls, x, layout, backend, token_domains)   # stream order
        stream_rank = torch.searchsorted(layout.cu_seqlens[:-1].long(), batch["seq_cls_index"])
        return EncoderOutput(hidden=None, pooled=cls.index_select(0, stream_rank), mlm_hidden=mlm_hidden)

    def _run_layer(self, fn: Any, x: torch.Tensor, layout: AttentionLayout, backend: str,
                   token_domains: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(fn, x, layout, backend, token_domains, use_reentrant=False)
        return fn(x, layout, backend, token_domains)

    @property
    def cls_only_last_layer(self) -> bool:
        """Whether ``forward(pooled_only=True)`` computes the last layer for [CLS] rows only ([CLS]
        pooling and the setting on; the MLM reads the last bottom layer, always below it)."""
        return self.config.pooling == "cls" and self.config.cls_only_last_layer

    def pool(self, hidden: torch.Tensor, batch: Mapping[str, Any], layout: AttentionLayout) -> torch.Tensor:
        """[CLS] output or the mean over real tokens, one vector per sequence."""
        if self.config.pooling == "cls":
            return hidden.index_select(0, batch["seq_cls_index"])
        real = (batch["token_type_ids"] != self.config.pad_type_id).to(hidden.dtype)
        weight = real / batch["seq_lengths"].index_select(0, batch["token_seq_index"]).to(hidden.dtype)
        pooled = hidden.new_zeros(batch["seq_lengths"].shape[0], hidden.shape[1])
        return pooled.index_add(0, batch["token_seq_index"], hidden * weight[:, None])

    def training_flops(self, batch: Mapping[str, Any], include_mlm: bool = True, pooled_only: bool = False
                       ) -> float:
        """Model FLOPs of one forward + backward (3x forward) on the real tokens of ``batch``.

        Counts matmuls only (linear layers, adapters, attention scores and mixing, the MLM head at
        the masked positions), from Python ints of the batch: no host sync, usable for MFU on
        every step.  Padding is never counted, so MFU compares layouts fairly.  ``pooled_only``
        counts ``forward(batch, pooled_only=True)``: with :attr:`cls_only_last_layer` the last
        layer projects keys and values for every token but the rest for the [CLS] rows only.
        """
        cls_rows = len(batch["seq_lengths"]) if pooled_only and self.cls_only_last_layer else None
        return training_flops(self.backbone_config, self.config, batch["num_real_tokens"],
                              batch["num_attention_pairs"], batch["mlm_positions"].shape[0] if include_mlm else 0,
                              cls_only_sequences=cls_rows)

    def encode_sequences(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Pooled vectors [B, H] of history sequences."""
        return self(batch, pooled_only=True).pooled

    def encode_items(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Pooled vectors [N, H] of ``[CLS] item`` sequences (from ``PackedCollator.collate_items``)."""
        return self(batch, pooled_only=True).pooled

    def score(self, seq_vecs: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """Cosine similarity / temperature, [B, N], computed in fp32 (fp64 for fp64 vectors)."""
        wide = torch.promote_types(torch.promote_types(seq_vecs.dtype, item_vecs.dtype), torch.float32)
        s = F.normalize(seq_vecs.to(wide), dim=-1)
        i = F.normalize(item_vecs.to(wide), dim=-1)
        return s @ i.T / self.config.temperature

    def mlm_logits(self, mlm_hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits at the given stream positions, read from the last bottom layer."""
        return self.lm_head(mlm_hidden.index_select(0, positions))

    def mlm_loss(self, output: EncoderOutput, batch: Mapping[str, Any]) -> torch.Tensor:
        """Mean cross-entropy (fp32) over the masked tokens; 0 (still in the graph) when none."""
        positions = batch["mlm_positions"]
        if positions.shape[0] == 0:
            return output.mlm_hidden.sum().float() * 0.0
        logits = self.mlm_logits(output.mlm_hidden, positions)
        return F.cross_entropy(logits.float(), batch["mlm_labels"].index_select(0, positions))


def _load_tokenizer(directory: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # An export's config.json says model_type "reolm", which transformers does not know; it warns
    # on every load although only the tokenizer files are read. Silence that one call.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory}: cannot load its tokenizer with AutoTokenizer: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
