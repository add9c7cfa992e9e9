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

``eager`` and ``sdpa`` need rectangular ``[n, heads, L, head_dim]`` grids.  To
keep padding small there too, the collator packs sequences longest first and
splits them into a few contiguous **attention groups** (a new group starts
when a sequence is shorter than ``bucket_ratio`` x the group's longest); it
precomputes on CPU every token's slot in its group's grid
(``attn_grid_index``), the stream row behind every slot (``attn_grid_source``) and the groups'
shapes (Python ints), so the forward never syncs with the host and only groups with padding
need a gather in and out of their grid.  Every backend also
computes attention for the first token of each sequence only (``cls_only=True``: q is
``[B, h, d]``, one [CLS] query per sequence in stream order, against all of its keys), which
is all a [CLS]-pooled last layer needs.  Backends are plain
functions registered in ``BACKENDS``; pick one with :func:`resolve_backend`
(``auto`` = flash if importable on CUDA, else varlen on CUDA unless attention dropout is on,
else sdpa).
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F

from reolm.model.dropout import dropout as drop

if TYPE_CHECKING:
    from reolm.data.batch import PackedBatch

__all__ = ["AttentionLayout", "BACKENDS", "math_attention", "resolve_backend", "compute_dtype", "attention", "flash_available",
           "varlen_available", "fused_head_dim_ok"]

_K = TypeVar("_K")  # a packed-only backend's kernel (or kernel and keyword arguments)


@dataclass
class AttentionLayout:
    """Where each sequence lives in the token stream (tensors on the compute device)."""

    cu_seqlens: torch.Tensor          # int32 [B + 1]: start of each sequence's slots, then the end
    max_seqlen: int                   # longest sequence (packed) / slots per sequence (padded)
    grid_index: torch.Tensor          # int64 [T]: slot of each token in its group's [n, L] grid
    seq_lengths: torch.Tensor         # int64 [B]: real lengths of the sequences, in stream order
    groups: Sequence[Sequence[int]]   # per group (tokens, sequences, longest), Python ints
    padded: bool = False              # the stream already is one [B * max_seqlen] grid
    # int64, per slot of every group that has padding, the row of the group (0-based) that fills
    # it (see reolm.data.collate.grid_sources); None = derived from grid_index on the device
    grid_source: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.grid_source is None:
            self.grid_source = _derive_grid_source(self.grid_index, self.groups, self.padded)

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def cls_rows(self) -> torch.Tensor:
        """int64 [B]: the stream row of every sequence's first token ([CLS]), in stream order."""
        return self.cu_seqlens[:-1].long()

    @classmethod
    def from_batch(cls, batch: "PackedBatch") -> "AttentionLayout":
        return cls(batch.cu_seqlens, int(batch.max_seqlen), batch.attn_grid_index, batch.stream_seq_lengths,
                   batch.attn_groups, batch.padded, grid_source=batch.attn_grid_source)


def _derive_grid_source(grid_index: torch.Tensor, groups: Sequence[Sequence[int]], padded: bool) -> torch.Tensor:
    """``grid_source`` from ``grid_index`` (padding slots read row 0 of their group), on its device."""
    parts = []
    for (tokens, n, length), idx in zip(groups, grid_index.split([g[0] for g in groups])):
        if not (padded or tokens == n * length):
            rows = torch.arange(tokens, device=idx.device)
            parts.append(torch.zeros(n * length, dtype=torch.int64, device=idx.device).index_copy(0, idx, rows))
    return torch.cat(parts) if parts else grid_index.new_zeros(0)


# ----------------------------------------------------------------------------- grouped-grid helpers

GridFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _on_grids(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
              grid_fn: GridFn, cls_only: bool = False) -> torch.Tensor:
    """Run ``grid_fn(q, k, v, key_mask)`` on each group's ``[n, h, L, d]`` grid; back to ``[T, h, d]``.

    A group whose slots are all real tokens (or a padded stream) is already its grid: q/k/v are
    viewed, never copied.  Otherwise each grid is *gathered* from the stream with the host-made
    ``grid_source`` (padding slots repeat a real row; as keys they are masked, as queries they are
    never read back), which is several times cheaper on CPU than zero-filling a grid and
    scattering into it.  ``key_mask`` (bool ``[n, 1, 1, L]``, True = real key) is None for a group
    without padding, so SDPA can pick its fused kernels there.  With ``cls_only``, ``q`` holds one
    query per sequence (``[B, h, d]``, stream order): each group's query grid is ``[n, h, 1, d]``
    and the result is ``[B, h, d]``.
    """
    sizes, counts = [g[0] for g in layout.groups], [g[1] for g in layout.groups]
    gathered = [not (layout.padded or tokens == n * length) for tokens, n, length in layout.groups]
    sources = layout.grid_source.split([n * length if g else 0
                                        for (_, n, length), g in zip(layout.groups, gathered)])
    queries = q.split(counts) if cls_only else q.split(sizes)
    outs = []
    for (tokens, n, length), gather, qp, kp, vp, src, idx, lens in zip(
            layout.groups, gathered, queries, k.split(sizes), v.split(sizes), sources,
            layout.grid_index.split(sizes), layout.seq_lengths.split(counts)):
        if gather:
            kp, vp = kp.index_select(0, src), vp.index_select(0, src)
            if not cls_only:
                qp = qp.index_select(0, src)
        kg, vg = (t.view(n, length, *t.shape[1:]).transpose(1, 2) for t in (kp, vp))   # [n, h, L, d]
        mask = None
        if layout.padded or gather:
            slots = torch.arange(length, device=k.device)
            mask = (slots[None, :] < lens[:, None]).view(n, 1, 1, length)
        if cls_only:
            outs.append(grid_fn(qp.unsqueeze(2), kg, vg, mask).squeeze(2))              # [n, h, d]
            continue
        out = grid_fn(qp.view(n, length, *qp.shape[1:]).transpose(1, 2), kg, vg, mask)   # [n, h, L, d]
        out = out.transpose(1, 2).reshape(n * length, *q.shape[1:])
        outs.append(out.index_select(0, idx) if gather else out)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# ----------------------------------------------------------------------------- backends

def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
                    dropout_p: float = 0.0, training: bool = False, cls_only: bool = False) -> torch.Tensor:
    """Reference math: softmax(q k^T / sqrt(d)) v with the softmax in fp32 (or fp64 for fp64 inputs)."""
    def grid_fn(qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        wide = torch.promote_types(qg.dtype, torch.float32)
        scores = torch.matmul(qg.to(wide), kg.to(wide).transpose(-1, -2)) / math.sqrt(qg.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = F.dropout(probs, p=dropout_p, training=training).to(vg.dtype)
        return torch.matmul(probs, vg)
    return _on_grids(q, k, v, layout, grid_fn, cls_only)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
                   dropout_p: float = 0.0, training: bool = False, cls_only: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on the grouped grids with a key-padding mask."""
    def grid_fn(qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask,
                                              dropout_p=dropout_p if training else 0.0)
    return _on_grids(q, k, v, layout, grid_fn, cls_only)


MATH_MAX_LENGTH = 192  # measured crossover with SDPA's CPU kernel: math 2.7x faster at 120 tokens, 2.4x slower at 300


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
                   dropout_p: float = 0.0, training: bool = False, cls_only: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with both matmuls in the inputs' dtype and the softmax in fp32.

    The CPU training backend (``auto`` picks it there): for the short sequences of recommendation
    (items of ~30 tokens, histories of a few hundred) the backward pass of SDPA's fused CPU kernel
    is ~3x slower than autograd through these two batched matmuls (``bench/cpu_speed.py``), and
    attention dropout costs it nothing extra.  Unlike ``eager`` (the fp32 reference) the scores
    are rounded to the inputs' dtype before the fp32 softmax, as HF BERT under autocast does.
    Groups longer than :data:`MATH_MAX_LENGTH` without dropout go to SDPA, whose fused kernel wins
    there (a history of 300 tokens: 2.4x faster forward + backward).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    dropout = dropout_p if training else 0.0

    def grid_fn(qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if dropout == 0 and kg.shape[-2] > MATH_MAX_LENGTH:
            return F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask)
        scores = torch.matmul(qg, kg.transpose(-1, -2))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float() * scale, dim=-1)
        probs = drop(probs, dropout, dropout > 0)
        return torch.matmul(probs.to(vg.dtype), vg)
    return _on_grids(q, k, v, layout, grid_fn, cls_only)


def _query_layout(layout: AttentionLayout, cls_only: bool) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, max_seqlen) of the queries: the keys' own, or one query per sequence."""
    if not cls_only:
        return layout.cu_seqlens, layout.max_seqlen
    return torch.arange(layout.num_sequences + 1, dtype=torch.int32, device=layout.cu_seqlens.device), 1


def _packed_kernel(layout: AttentionLayout, name: str, kernel: _K | None, missing_message: str) -> _K:
    """The kernel of a backend that runs packed batches only (varlen, flash): refused on a padded
    batch, then ``missing_message`` raised when this install lacks it."""
    if layout.padded:
        raise ValueError(f"the {name} attention backend needs a packed batch (layout='packed'); "
                         f"use eager or sdpa for padded batches")
    if kernel is None:
        raise RuntimeError(missing_message)
    return kernel


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
                     dropout_p: float = 0.0, training: bool = False, cls_only: bool = False) -> torch.Tensor:
    """PyTorch's ``torch.nn.attention.varlen.varlen_attn`` (CUDA; no attention dropout)."""
    fn, extra = _packed_kernel(layout, "varlen", _varlen_fn(), "torch.nn.attention.varlen.varlen_attn is not "
                               f"available in this torch ({torch.__version__}); use attention=sdpa")
    cu_q, max_q = _query_layout(layout, cls_only)
    return fn(q, k, v, cu_q, layout.cu_seqlens, max_q, layout.max_seqlen, **extra)


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
                    dropout_p: float = 0.0, training: bool = False, cls_only: bool = False) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func`` (CUDA, optional dependency)."""
    fn = _packed_kernel(layout, "flash", _flash_fn(),
                        "attention=flash but flash_attn is not installed (pip install flash-attn)")
    cu_q, max_q = _query_layout(layout, cls_only)
    return fn(q, k, v, cu_q, layout.cu_seqlens, max_q, layout.max_seqlen,
              dropout_p=dropout_p if training else 0.0, causal=False)


AttentionFn = Callable[..., torch.Tensor]
BACKENDS: dict[str, AttentionFn] = {
    "eager": eager_attention,
    "math": math_attention,
    "sdpa": sdpa_attention,
    "varlen": varlen_attention,
    "flash": flash_attention,
}


_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(device: torch.device | str, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype attention actually runs in: autocast's when autocast is on for ``device``, else the
    parameters'.  Fine-tuning keeps fp32 parameters under bf16 autocast; judging by the parameters
    alone would rule out the fused (half-precision) kernels there."""
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return param_dtype


def fused_head_dim_ok(head_dim: int | None) -> bool:
    """Whether the varlen kernels take this head size: flash's kernels (flash-attn's and the copy
    torch's ``varlen_attn`` calls) reject a head_dim that is not a multiple of 8 or is above 256."""
    return head_dim is None or (head_dim % 8 == 0 and 0 < head_dim <= 256)


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype | None = None,
                    dropout_p: float = 0.0, head_dim: int | None = None, training: bool = False) -> str:
    """The concrete backend for ``name`` on ``device`` (``auto`` picks the fastest available).

    The varlen kernels (flash, varlen) need CUDA, fp16/bf16 activations and a head_dim that is a
    multiple of 8 up to 256; ``auto`` falls back to sdpa otherwise, an explicit choice raises.
    ``dropout_p`` is the attention dropout this forward applies (0 in evaluation): varlen has
    none, so ``auto`` then skips it for a kernel that applies it (flash, else sdpa), and an
    explicit varlen raises rather than train a different model than asked.  Off CUDA, ``auto``
    is sdpa (its fused CPU forward) for evaluation and ``math`` for training (``training``),
    whose backward is several times faster than sdpa's on short sequences.
    """
    device = torch.device(device)
    fused_ok = device.type == "cuda" and (dtype is None or dtype in _HALF) and fused_head_dim_ok(head_dim)
    if name == "auto":
        if fused_ok and _flash_fn() is not None:
            return "flash"
        if fused_ok and _varlen_fn() is not None and dropout_p == 0:
            return "varlen"
        return "math" if training and device.type == "cpu" else "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    if name in ("varlen", "flash") and not fused_ok:
        raise ValueError(f"attention backend {name!r} needs CUDA, fp16/bf16 and a head size that is a multiple "
                         f"of 8 up to 256 (got {device}, {dtype}, head_dim={head_dim}); use sdpa or auto")
    if name == "varlen" and dropout_p > 0:
        raise ValueError(f"attention backend 'varlen' has no attention dropout but {dropout_p} is set; use auto "
                         f"or sdpa, or set model.attention_dropout=0")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout,
              backend: str = "auto", dropout_p: float = 0.0, training: bool = False) -> torch.Tensor:
    """Bidirectional attention within each sequence of the stream; q/k/v and result ``[T, h, d]``."""
    name = resolve_backend(backend, q.device, q.dtype, dropout_p if training else 0.0, q.shape[-1], training)
    return BACKENDS[name](q, k, v, layout, dropout_p, training)
