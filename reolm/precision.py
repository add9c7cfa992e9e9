"""Numeric precision of fine-tuning, evaluation, embedding and serving: ``auto | fp32 | bf16``.

* **bf16** runs the matmuls in bfloat16: training under ``torch.autocast`` with fp32 master
  weights (the optimiser, losses, scores and softmax stay fp32); inference without gradient on
  CPU with a bfloat16 copy of the weights (:func:`inference_copy`), because autocast there
  converts every activation back and forth around each LayerNorm and residual add, which costs
  more than the matmuls it speeds up on short item sequences.
* **fp32** is plain float32 everywhere.
* **auto** is bf16 on CUDA (as it always was) and, for models at least
  :data:`CPU_BF16_MIN_HIDDEN` wide, on CPUs that report native bf16 matmuls in /proc/cpuinfo
  (Intel AMX or AVX512-BF16, Arm BF16), where they run ~4x faster than fp32; fp32 for narrower
  models (too small for bf16 to pay for its casts) and on other CPUs (and where /proc/cpuinfo is
  absent, e.g. macOS), where bf16 may be emulated and slower than fp32.

The device these settings resolve for is itself resolved once, by :func:`resolve_device` (``auto``:
CUDA when there is one).

Pre-training keeps its own ``optim.precision`` (it adds fp16 with loss scaling, through DeepSpeed);
its ``auto`` on CPU asks :func:`cpu_has_fast_bf16` too.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from pathlib import Path

import torch
from torch import nn

__all__ = ["PRECISIONS", "PRECISION_DOC", "CPU_BF16_MIN_HIDDEN", "cpu_has_fast_bf16", "cpu_bf16_flags",
           "check_precision", "resolve_device", "resolve_precision",
           "autocast", "inference_copy"]

PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_DOC = ("Numeric precision: auto = bf16 on CUDA and, for models at least 256 wide, on CPUs "
                 "with native bf16 matmuls (AMX, AVX512-BF16, Arm BF16), fp32 elsewhere; bf16 = bfloat16 "
                 "matmuls with fp32 weights, losses and scores; fp32 = float32 throughout.")

# Below this width a CPU model's matmuls are too small for bf16 to pay for its casts: the demo's
# 128-wide model fine-tuned 1.6-2x slower per epoch in bf16 than in fp32, while the 384-wide
# all-MiniLM-L6-v2 ran a stage-1 step 2.2x faster (bench/cpu_speed.py, this project's AMX machine).
CPU_BF16_MIN_HIDDEN = 256

# /proc/cpuinfo flags (x86) and features (Arm) of CPUs that multiply bf16 natively.
_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native-bf16 flags this CPU reports (``cpuinfo``: the text of /proc/cpuinfo, read when None)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    words: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            words.update(value.split())
    return [flag for flag in _BF16_FLAGS if flag in words]


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has native bf16 matmuls (read once per process)."""
    return bool(cpu_bf16_flags())


def check_precision(requested: str) -> str:
    """``requested`` if it is one of :data:`PRECISIONS`, else a ValueError naming them."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    return requested


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available on this machine")
    return device


def resolve_precision(requested: str, device: torch.device | str, fast_cpu_bf16: bool | None = None,
                      hidden_size: int | None = None) -> str:
    """``fp32`` or ``bf16`` for ``requested`` on ``device`` (``fast_cpu_bf16``: the CPU check's
    answer, asked when None; ``hidden_size``: the model's width, when known)."""
    if check_precision(requested) != "auto":
        return requested
    if torch.device(device).type == "cuda":
        return "bf16"
    if hidden_size is not None and hidden_size < CPU_BF16_MIN_HIDDEN:
        return "fp32"
    if fast_cpu_bf16 is None:
        fast_cpu_bf16 = cpu_has_fast_bf16()
    return "bf16" if fast_cpu_bf16 else "fp32"


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for a resolved ``bf16``; nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inference_copy(module: nn.Module) -> nn.Module:
    """A bfloat16 copy of ``module`` in eval mode for encoding without gradient."""
    return copy.deepcopy(module).to(torch.bfloat16).eval().requires_grad_(False)
