"""Bidirectional attention over a token stream, behind one interface with several backends.

The encoder works on a flat token stream ``[T, heads, head_dim]``.  An
:class:`AttentionLayout` says how the stream splits into sequences:

* **packed** (the normal case): sequences are concatenated without padding;
  ``cu_seqlens`` (int32, ``[B + 1]``) holds their boundaries and
  ``max_seqlen`` (a Python int) the longest length.  The varlen kernels
  (``flash``, ``varlen``) consume this directly, so no compute is spent on
  padding.
* **padded**: every sequence owns ``max_seqlen`` slots of the stream (real
  tokens then padding), like a classic ``[B, L]`` batch; only ``eager`` and
  ``sdpa`` accept it.  Used by benchmarks and the HF parity tests.

``eager`` and ``sdpa`` need a ``[B, heads, L, head_dim]`` layout: the scatter
into it and the gather back use ``padded_index`` (the flat ``[B * L]`` slot of
every token), computed by the collator on CPU, so the forward never syncs
with the host.  Backends are plain functions registered in ``BACKENDS``; pick
one with :func:`resolve_backend` (``auto`` = flash if importable on CUDA, else
varlen on CUDA, else sdpa).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

__all__ = ["AttentionLayout", "BACKENDS", "resolve_backend", "attention", "flash_available",
           "varlen_available"]


@dataclass
class AttentionLayout:
    """Where each sequence lives in the token stream (all tensors on the compute device)."""

    cu_seqlens: torch.Tensor     # int32 [B + 1]: start offset of each sequence's slots, then the end
    max_seqlen: int              # longest sequence (packed) / slots per sequence (padded)
    seq_lengths: torch.Tensor    # int64 [B]: real tokens per sequence
    padded_index: torch.Tensor   # int64 [T]: flat slot of each token in a [B, max_seqlen] grid
    padded: bool = False         # True when the stream already is the [B * max_seqlen] grid

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @classmethod
    def from_batch(cls, batch: Mapping[str, object]) -> "AttentionLayout":
        return cls(batch["cu_seqlens"], int(batch["max_seqlen"]), batch["seq_lengths"],
                   batch["padded_index"], batch.get("layout", "packed") == "padded")


# ----------------------------------------------------------------------------- padded-layout helpers

def _to_grid(x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """[T, h, d] stream -> [B, h, L, d] grid (zeros in padding slots)."""
    b, length = layout.num_sequences, layout.max_seqlen
    if layout.padded:
        grid = x
    else:
        grid = x.new_zeros((b * length,) + tuple(x.shape[1:])).index_copy(0, layout.padded_index, x)
    return grid.view(b, length, *x.shape[1:]).transpose(1, 2)


def _from_grid(grid: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    """[B, h, L, d] grid -> [T, h, d] stream."""
    b, h, length, d = grid.shape
    flat = grid.transpose(1, 2).reshape(b * length, h, d)
    return flat if layout.padded else flat.index_select(0, layout.padded_index)


def _key_mask(layout: AttentionLayout, device: torch.device) -> torch.Tensor:
    """bool [B, 1, 1, L]: True where the key slot holds a real token."""
    slots = torch.arange(layout.max_seqlen, device=device)
    return (slots[None, :] < layout.seq_lengths[:, None]).view(layout.num_sequences, 1, 1, -1)


# ----------------------------------------------------------------------------- backends

def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
                    dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Reference math: softmax(q k^T / sqrt(d)) v with the softmax in fp32."""
    qg, kg, vg = (_to_grid(t, layout) for t in (q, k, v))
    scores = torch.matmul(qg.float(), kg.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~_key_mask(layout, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout_p, training=training).to(vg.dtype)
    return _from_grid(torch.matmul(probs, vg), layout)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
                   dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on the padded grid with a key-padding mask."""
    qg, kg, vg = (_to_grid(t, layout) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=_key_mask(layout, q.device),
                                         dropout_p=dropout_p if training else 0.0)
    return _from_grid(out, layout)


def _require_packed(layout: AttentionLayout, name: str) -> None:
    if layout.padded:
        raise ValueError(f"the {name} attention backend needs a packed batch (layout='packed'); "
                         f"use eager or sdpa for padded batches")


@functools.lru_cache(maxsize=1)
def _varlen_fn() -> tuple[Callable[..., torch.Tensor], dict[str, object]] | None:
    """``varlen_attn`` and the extra keyword arguments its signature in this torch needs."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    extra: dict[str, object] = {}
    if "is_causal" in params:        # torch 2.9: explicit is_causal flag
        extra["is_causal"] = False
    if "window_size" in params:      # torch >= 2.10: (-1, -1) = full bidirectional window
        extra["window_size"] = (-1, -1)
    return varlen_attn, extra


def varlen_available() -> bool:
    return _varlen_fn() is not None and torch.cuda.is_available()


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
                     dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (CUDA; no attention dropout)."""
    _require_packed(layout, "varlen")
    found = _varlen_fn()
    if found is None:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn is not available in this torch "
                           f"({torch.__version__}); use attention=sdpa")
    fn, extra = found
    cu = layout.cu_seqlens
    return fn(q, k, v, cu, cu, layout.max_seqlen, layout.max_seqlen, **extra)


@functools.lru_cache(maxsize=1)
def _flash_fn() -> Callable[..., torch.Tensor] | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def flash_available() -> bool:
    return _flash_fn() is not None and torch.cuda.is_available()


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
                    dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func`` (CUDA, optional dependency)."""
    _require_packed(layout, "flash")
    fn = _flash_fn()
    if fn is None:
        raise RuntimeError("attention=flash but flash_attn is not installed (pip install flash-attn)")
    cu = layout.cu_seqlens
    return fn(q, k, v, cu, cu, layout.max_seqlen, layout.max_seqlen,
              dropout_p=dropout_p if training else 0.0, causal=False)


AttentionFn = Callable[..., torch.Tensor]
BACKENDS: dict[str, AttentionFn] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "varlen": varlen_attention,
    "flash": flash_attention,
}


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The concrete backend for ``name`` on ``device`` (``auto`` picks the fastest available)."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda" and _flash_fn() is not None:
            return "flash"
        if device.type == "cuda" and _varlen_fn() is not None:
            return "varlen"
        return "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    if name in ("varlen", "flash") and device.type != "cuda":
        raise ValueError(f"attention backend {name!r} needs CUDA (got device {device}); use sdpa or auto")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
              backend: str = "auto", dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Bidirectional attention within each sequence of the stream; q/k/v and result ``[T, h, d]``."""
    return BACKENDS[resolve_backend(backend, q.device)](q, k, v, layout, dropout_p, training)
