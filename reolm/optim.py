"""Optimisation shared by every trainer: AdamW settings, clipping and the learning-rate schedule.

:class:`OptimConfig` is the one declaration of these settings.  Each trainer's section extends it
(pre-training's ``optim`` adds the run length and batch layout, fine-tuning's ``train`` and
``reolm.stage1``/``stage2`` add epochs and early stopping) and only changes defaults, so
``lr``, ``warmup_steps`` or ``schedule`` mean the same everywhere.

:func:`lr_factor` is the one schedule: linear warm-up, an optional hold at the peak, then
constant, linear or cosine decay.  Pre-training hands it to DeepSpeed
(:func:`reolm.train.ds_config.lr_scheduler_factory`); fine-tuning and the baselines step it in
the runner's loop (:func:`lr_schedule`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from reolm.config import param

__all__ = ["OptimConfig", "SCHEDULES", "lr_factor", "lr_schedule", "adamw", "optim_settings"]

SCHEDULES = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation: AdamW, gradient clipping, warm-up + decay of the learning rate."""

    lr: float = param(5e-5, "Peak learning rate.", gt=0)
    weight_decay: float = param(0.01, "AdamW decoupled weight decay.", ge=0)
    betas: list[float] = param([0.9, 0.999], "AdamW betas.", ge=0, lt=1)
    eps: float = param(1e-8, "AdamW epsilon.", gt=0)
    grad_clip: float = param(1.0, "Clip the global gradient norm to this value; 0 = no clipping.", ge=0)
    schedule: str = param("linear", "LR after warm-up (and hold): constant, or linear / cosine decay that "
                                    "would reach min_lr_ratio x lr one step after the last step.",
                          choices=SCHEDULES)
    warmup_steps: int = param(100, "Linear warm-up: optimizer step i (0-based) uses lr x (i + 1) / "
                                   "warmup_steps, so the first step is never at lr 0.", ge=0)
    hold_steps: int = param(0, "Steps kept at the peak lr after the warm-up before the decay starts "
                               "(fine-tuning: 1, pre-training: 0).", ge=0)
    min_lr_ratio: float = param(0.0, "LR at the end of the decay, as a fraction of lr.", ge=0, le=1)


def lr_factor(optim: OptimConfig, step: int, total_steps: int) -> float:
    """Multiplier of ``optim.lr`` for the optimizer step with 0-based index ``step`` of ``total_steps``."""
    warmup = optim.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if optim.schedule == "constant":
        return 1.0
    decay_start = warmup + optim.hold_steps
    decay_steps = max(total_steps + 1 - decay_start, 1)
    progress = min(max(step + 1 - decay_start, 0) / decay_steps, 1.0)
    floor = optim.min_lr_ratio
    if optim.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)


def lr_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int
                ) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` as a torch scheduler, stepped after every optimizer step.

    The factor is a closure, not a callable object: ``LambdaLR.state_dict`` would otherwise store
    the object (and the config in it) in every checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(optim, step, total_steps))


def adamw(params: Iterable[torch.nn.Parameter] | Iterable[dict], optim: OptimConfig) -> torch.optim.AdamW:
    """torch's AdamW with the section's settings (parameters or parameter groups)."""
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay)


def optim_settings(section: OptimConfig) -> dict[str, Any]:
    """The :class:`OptimConfig` fields of ``section`` (any section extending it), by name."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(OptimConfig)}
