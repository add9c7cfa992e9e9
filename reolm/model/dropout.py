"""Dropout whose random mask is cheap on CPU.

``F.dropout`` on CPU draws one Bernoulli sample per element through a serial generator; on a
fine-tuning step of Reo-LM (~35k tokens) that was 13% of the step.  Here each 64-bit draw of
torch's generator gives the keep/drop decision of four elements (16 random bits each), which
makes the mask ~5x cheaper and the whole dropout forward + backward ~2x (``bench/cpu_speed.py``).
The drop probability is ``p`` rounded to a multiple of 2^-16 (0.1 -> 0.100006); the mask follows
``torch.manual_seed`` like any other draw.  On other devices this is ``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["dropout", "Dropout", "keep_mask"]

_LANES = 4          # 16-bit lanes per int64 draw
_LANE_VALUES = 1 << 16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """bool mask of ``shape``, each element True with probability 1 - p (p rounded to 2^-16)."""
    n = 1
    for size in shape:
        n *= size
    draws = torch.randint(-2**63, 2**63 - 1, ((n + _LANES - 1) // _LANES,), dtype=torch.int64, device=device,
                          generator=generator)
    lanes = draws.view(torch.int16)[:n].view(shape)   # uniform over [-32768, 32767]
    return lanes >= round(p * _LANE_VALUES) - _LANE_VALUES // 2


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1 / (1 - p), in training."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or p >= 1:
        return F.dropout(x, p, True)
    return x * (keep_mask(x.shape, p, x.device) * (1.0 / (1.0 - p))).to(x.dtype)


class Dropout(nn.Module):
    """``nn.Dropout`` through :func:`dropout` (no parameters: checkpoints are unaffected)."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
