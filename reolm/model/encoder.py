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
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from reolm.config import from_dict, upgrade_renamed_keys
from reolm.data.batch import PackedBatch
from reolm.model import hf_checkpoint as hf
from reolm.model import objectives
from reolm.model.attention import AttentionLayout, BACKENDS, compute_dtype, resolve_backend
from reolm.model.config import TOP_ROUTINGS, ModelConfig
from reolm.model.dropout import Dropout
from reolm.model.hf_checkpoint import BackboneConfig, CheckpointError

__all__ = ["ReoLM", "EncoderOutput", "MixtureOfAdapters", "training_flops"]

log = logging.getLogger(__name__)

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
        self.item_position_embeddings = nn.Embedding(cfg.max_history_items + 1, h)
        # The image token's embedding: MLP of the item's image feature (d -> 2d -> H).
        d = cfg.image_feature_dim
        self.image_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, h))
        self.void_image = nn.Parameter(torch.zeros(h))  # items without an image
        self.LayerNorm = nn.LayerNorm(h, eps=bb.layer_norm_eps)
        self.dropout = Dropout(dropout)
        self.position_offset = bb.position_offset

    def image_embeddings(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        mlp_out = self.image_mlp(features.to(self.void_image.dtype))
        return torch.where(present[:, None], mlp_out, self.void_image.expand_as(mlp_out))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.word_embeddings(batch.input_ids)
        slots = batch.image_token_index
        if slots.shape[0]:
            images = self.image_embeddings(batch.image_features, batch.image_present)
            x = x.index_put((slots,), images.to(x.dtype))  # out of place: autograd-safe
        x = (x + self.position_embeddings(batch.position_ids + self.position_offset)
             + self.token_type_embeddings(batch.token_type_ids)
             + self.item_position_embeddings(batch.item_position_ids))
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
    """Multi-head attention over the packed stream, through the backend the model resolved."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.heads = heads
        self.dropout = dropout

    def forward(self, x: torch.Tensor, layout: AttentionLayout, backend: str, cls: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Context vectors [T, H] of every token, or with ``cls`` (the [CLS] rows of ``x``, [B, H]) of
        those rows only, their keys and values still from every token."""
        queries = x if cls is None else cls
        # Separate module calls (not one fused matmul): ZeRO-3 gathers weights per module forward.
        q = self.query(queries).view(queries.shape[0], self.heads, -1)
        k, v = (p(x).view(x.shape[0], self.heads, -1) for p in (self.key, self.value))
        ctx = BACKENDS[backend](q, k, v, layout, self.dropout, self.training, cls_only=cls is not None)
        return ctx.reshape(queries.shape)


class DenseResidualNorm(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)`` — BERT's post-LN sub-layer output."""

    def __init__(self, d_in: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, extra: torch.Tensor | None = None
                ) -> torch.Tensor:
        y = self.dropout(self.dense(x)) + residual
        if extra is not None:
            y = y + extra
        return self.LayerNorm(y)


class AttentionBlock(nn.Module):
    """Self-attention, then the post-LN output sub-layer around it."""

    def __init__(self, hidden: int, heads: int, eps: float, dropout: float, attn_dropout: float):
        super().__init__()
        self.self = SelfAttention(hidden, heads, attn_dropout)
        self.output = DenseResidualNorm(hidden, hidden, eps, dropout)

    def forward(self, x: torch.Tensor, layout: AttentionLayout, backend: str, cls: torch.Tensor | None = None
                ) -> torch.Tensor:
        """[T, H], or [B, H] at the ``cls`` rows (see :meth:`SelfAttention.forward`)."""
        return self.output(self.self(x, layout, backend, cls), x if cls is None else cls)


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
        self.attention = AttentionBlock(h, bb.num_attention_heads, bb.layer_norm_eps, hidden_dropout, attn_dropout)
        self.intermediate = Intermediate(h, bb.intermediate_size, bb.hidden_act)
        self.output = DenseResidualNorm(bb.intermediate_size, h, bb.layer_norm_eps, hidden_dropout)
        self.adapter = MixtureOfAdapters(h, cfg.num_adapters, cfg.adapter_rank, cfg.adapter_scale,
                                         cfg.adapter_activation)
        self.routing = routing

    def forward(self, x: torch.Tensor, layout: AttentionLayout, backend: str,
                token_domains: torch.Tensor | None) -> torch.Tensor:
        return self._feed_forward(self.attention(x, layout, backend), token_domains)

    def forward_cls(self, x: torch.Tensor, layout: AttentionLayout, backend: str,
                    token_domains: torch.Tensor | None) -> torch.Tensor:
        """The layer's output at the first token of every sequence only, ``[B, H]`` in stream order.

        Keys and values still come from every token; the query, the attention output, the
        adapter and the feed-forward run on the B [CLS] rows alone.  Equal to
        ``forward(...)[cls rows]`` up to float summation order.
        """
        rows = layout.cls_rows
        h = self.attention(x, layout, backend, cls=x.index_select(0, rows))
        domains = token_domains.index_select(0, rows) if token_domains is not None else None
        return self._feed_forward(h, domains)

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
    """The layer stack; the MLM head reads the output of its bottom half."""

    def __init__(self, layers: list[Layer], num_bottom_layers: int):
        super().__init__()
        self.layer = nn.ModuleList(layers)
        self.num_bottom_layers = num_bottom_layers

    def forward(self, x: torch.Tensor, layout: AttentionLayout, backend: str, token_domains: torch.Tensor | None,
                cls_only_last: bool = False, checkpointing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(the last layer's output, the bottom half's output [T, H]).

        The last layer's output is [T, H], or with ``cls_only_last`` [B, H] at the [CLS] rows in
        stream order (:meth:`Layer.forward_cls`).  ``checkpointing`` recomputes each layer in the
        backward pass."""
        layers = self.layer
        mlm_hidden = x
        for i, layer in enumerate(layers[:-1] if cls_only_last else layers):
            x = _run_layer(layer.forward, x, layout, backend, token_domains, checkpointing)
            if i == self.num_bottom_layers - 1:
                mlm_hidden = x
        if cls_only_last:
            x = _run_layer(layers[-1].forward_cls, x, layout, backend, token_domains, checkpointing)
        return x, mlm_hidden


def _run_layer(fn: Callable[..., torch.Tensor], x: torch.Tensor, layout: AttentionLayout, backend: str,
               token_domains: torch.Tensor | None, checkpointing: bool) -> torch.Tensor:
    if checkpointing:
        return checkpoint(fn, x, layout, backend, token_domains, use_reentrant=False)
    return fn(x, layout, backend, token_domains)


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
    :meth:`from_pretrained` (a directory written by :meth:`save_pretrained`).  As in HF, the model
    holds no tokenizer: load it from the same folder with :func:`reolm.data.tables.load_tokenizer`
    and give it to what collates items (and to :meth:`save_pretrained`, which writes its files).
    """

    def __init__(self, backbone: BackboneConfig, cfg: ModelConfig):
        super().__init__()
        self.backbone_config = backbone
        self.config = cfg
        hidden_dropout = backbone.hidden_dropout_prob if cfg.hidden_dropout is None else cfg.hidden_dropout
        attn_dropout = (backbone.attention_probs_dropout_prob if cfg.attention_dropout is None
                        else cfg.attention_dropout)
        self.embeddings = Embeddings(backbone, cfg, self.num_position_rows(backbone, cfg), hidden_dropout)
        n = backbone.num_hidden_layers
        layers = [Layer(backbone, cfg, hidden_dropout, attn_dropout,
                        "mean" if i < n // 2 else cfg.top_routing) for i in range(n)]
        self.encoder = Encoder(layers, num_bottom_layers=n // 2)
        self.lm_head = LMHead(backbone, self.embeddings.word_embeddings)
        self.gradient_checkpointing = bool(cfg.gradient_checkpointing)  # null (automatic) = off until resolved
        self._backend_cache: dict[str, str] = {}
        self.attention_dropout = attn_dropout
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    @property
    def num_bottom_layers(self) -> int:
        """Layers of the bottom half: always mean-routed; the MLM head reads their output."""
        return self.encoder.num_bottom_layers

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
    def from_backbone(cls, hf_dir: str | os.PathLike, cfg: ModelConfig | None = None) -> "ReoLM":
        """A fresh Reo-LM on top of a plain HF BERT/RoBERTa checkpoint directory (strict key check,
        :func:`~reolm.model.hf_checkpoint.load_backbone_weights`)."""
        cfg = dataclasses.replace(cfg or ModelConfig(), backbone=str(hf_dir))
        model = cls(hf.read_backbone_config(hf_dir), cfg)
        hf.load_backbone_weights(model, hf.read_state_dict(hf_dir), source=str(hf_dir))
        return model

    def save_pretrained(self, directory: str | os.PathLike, tokenizer: Any | None,
                        extra_config: Mapping[str, Any] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` + ``tokenizer``'s files (one folder, swapped in
        atomically: the tokenizer is passed here, not kept on the model, so that it still lands in
        the same folder as the weights and the folder appears complete or not at all).

        ``extra_config`` adds top-level entries to config.json (e.g. ``origin``: where the weights
        came from), which :meth:`from_pretrained` ignores."""
        return hf.save_export(self, directory, tokenizer, extra_config)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> "ReoLM":
        """Load a directory written by :meth:`save_pretrained` (all keys must match exactly).

        ``overrides`` replaces run-time settings such as ``attention``, ``top_routing`` or
        ``gradient_checkpointing``; shape-changing settings come from the directory.
        """
        data = hf.read_export_config(directory)
        # An export of an older version may use old key names: upgraded before the overrides apply.
        saved = upgrade_renamed_keys(ModelConfig, data["reolm"])
        cfg = from_dict(ModelConfig, {**saved, **dict(overrides or {})})
        model = cls(BackboneConfig.from_dict(data["backbone"]), cfg)
        hf.load_complete_state(model, hf.read_state_dict(directory),
                               f"{directory}: weights do not match its config.json")
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
        """The backend this forward uses (``auto`` resolved for the device, dtype, head size and the
        attention dropout training applies, cached): training with dropout never gets varlen,
        which has none; evaluation and encoding keep it.  On CPU, training gets ``math``."""
        dropout = self.attention_dropout if self.training else 0.0
        key = (f"{self.config.attention}@{device.type}/{dtype}" + ("/dropout" if dropout > 0 else "")
               + ("/train" if self.training else ""))
        if key not in self._backend_cache:
            bb = self.backbone_config
            self._backend_cache[key] = resolve_backend(self.config.attention, device, dtype, dropout,
                                                       bb.hidden_size // bb.num_attention_heads, self.training)
        return self._backend_cache[key]

    # ------------------------------------------------------------------ forward
    def forward(self, batch: PackedBatch, pooled_only: bool = False) -> EncoderOutput:
        """Encode a packed (or padded) batch; see docs/model.md for its fields.

        ``pooled_only``: the caller reads ``pooled`` and ``mlm_hidden`` only, so with [CLS]
        pooling (and ``cls_only_last_layer``) the last layer runs on the [CLS] rows alone and
        ``hidden`` is None.
        """
        layout = AttentionLayout.from_batch(batch)
        device = batch.input_ids.device
        backend = self.attention_backend(device, compute_dtype(device, self.embeddings.LayerNorm.weight.dtype))
        token_domains = None
        if self.config.top_routing == "domain":
            token_domains = batch.seq_domains.index_select(0, batch.token_seq_index)
        cls_last = pooled_only and self.cls_only_last_layer
        top, mlm_hidden = self.encoder(self.embeddings(batch), layout, backend, token_domains, cls_only_last=cls_last,
                                       checkpointing=self.gradient_checkpointing and self.training)
        if not cls_last:
            return EncoderOutput(hidden=top, pooled=self.pool(top, batch, layout), mlm_hidden=mlm_hidden)
        stream_rank = torch.searchsorted(layout.cls_rows, batch.seq_cls_index)  # top is in stream order
        return EncoderOutput(hidden=None, pooled=top.index_select(0, stream_rank), mlm_hidden=mlm_hidden)

    @property
    def cls_only_last_layer(self) -> bool:
        """Whether ``forward(pooled_only=True)`` computes the last layer for [CLS] rows only ([CLS]
        pooling and the setting on; the MLM reads the last bottom layer, always below it)."""
        return self.config.pooling == "cls" and self.config.cls_only_last_layer

    def pool(self, hidden: torch.Tensor, batch: PackedBatch, layout: AttentionLayout) -> torch.Tensor:
        """[CLS] output or the mean over real tokens, one vector per sequence."""
        if self.config.pooling == "cls":
            return hidden.index_select(0, batch.seq_cls_index)
        real = (batch.token_type_ids != self.config.pad_type_id).to(hidden.dtype)
        weight = real / batch.seq_lengths.index_select(0, batch.token_seq_index).to(hidden.dtype)
        pooled = hidden.new_zeros(batch.num_sequences, hidden.shape[1])
        return pooled.index_add(0, batch.token_seq_index, hidden * weight[:, None])

    def training_flops(self, batch: PackedBatch, include_mlm: bool = True, pooled_only: bool = False
                       ) -> float:
        """Model FLOPs of one forward + backward (3x forward) on the real tokens of ``batch``.

        Counts matmuls only (linear layers, adapters, attention scores and mixing, the MLM head at
        the masked positions), from Python ints of the batch: no host sync, usable for MFU on
        every step.  Padding is never counted, so MFU compares layouts fairly.  ``pooled_only``
        counts ``forward(batch, pooled_only=True)``: with :attr:`cls_only_last_layer` the last
        layer projects keys and values for every token but the rest for the [CLS] rows only.
        """
        cls_rows = batch.num_sequences if pooled_only and self.cls_only_last_layer else None
        return training_flops(self.backbone_config, self.config, batch.num_real_tokens,
                              batch.num_attention_pairs, batch.mlm_positions.shape[0] if include_mlm else 0,
                              cls_only_sequences=cls_rows)

    def encode(self, batch: PackedBatch) -> torch.Tensor:
        """Pooled vectors [B, H] of a batch's sequences: histories, or ``[CLS] item`` sequences (from
        ``PackedCollator.collate_items``); the last layer runs on the [CLS] rows only when it can."""
        return self(batch, pooled_only=True).pooled

    def score(self, seq_vecs: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """Cosine similarity / temperature, [B, N], in fp32 (fp64 for fp64 vectors):
        :func:`reolm.model.objectives.similarity_scores`."""
        return objectives.similarity_scores(seq_vecs, item_vecs, "cosine", self.config.temperature)

    def mlm_logits(self, mlm_hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits at the given stream positions, read from the last bottom layer."""
        return self.lm_head(mlm_hidden.index_select(0, positions))

    def mlm_loss(self, output: EncoderOutput, batch: PackedBatch) -> torch.Tensor:
        """Mean cross-entropy (fp32) over the masked tokens (:func:`~reolm.model.objectives.masked_lm_loss`);
        0 (still in the graph) when none."""
        if batch.mlm_positions.shape[0] == 0:
            # The head does not run: its parameters keep no gradient (an optimiser then skips them).
            return output.mlm_hidden.sum().float() * 0.0
        return objectives.masked_lm_loss(*objectives.mlm_predictions(self, output, batch)).loss
