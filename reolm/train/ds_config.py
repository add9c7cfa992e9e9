"""Fill a DeepSpeed JSON config's ``"auto"`` fields from our typed config.

The JSON files under ``ds_configs/`` fix what is about the *system* (ZeRO stage, buckets,
offload, loss-scaler tuning); everything that is about the *run* (batch sizes, lr schedule,
precision, clipping) is ``"auto"`` and comes from :class:`PretrainConfig`, so the two can never
disagree.  Values a user wrote explicitly in the JSON are kept, except that a clash with the
run config (e.g. a literal micro-batch size that differs) is an error rather than a surprise.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from reolm import precision as numerics
from reolm.config import ConfigError
from reolm.io import read_json, write_text
from reolm.optim import lr_schedule
from reolm.train.config import PretrainOptimConfig

__all__ = ["resolve_precision", "engine_precision", "forward_autocast", "batch_layout", "fill_ds_config", "lr_scheduler_factory", "load_ds_config", "write_ds_config"]

AUTO = "auto"


def resolve_precision(requested: str, device_type: str, hidden_size: int | None = None) -> str:
    """``optim.precision`` resolved for this device: ``fp32``, ``bf16`` or ``fp16`` (GPU only).

    ``auto`` is bf16 on a GPU that supports it; on CPU it follows :func:`reolm.precision.resolve_precision`
    (bf16 where the CPU multiplies bf16 natively and the model is at least 256 wide, else fp32), the
    same rule fine-tuning and evaluation use."""
    if requested == "fp16" and device_type == "cpu":
        raise ConfigError("optim.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    if requested == AUTO and device_type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if requested == AUTO:
        return numerics.resolve_precision(AUTO, device_type, hidden_size=hidden_size)
    return requested


def engine_precision(precision: str, device_type: str) -> str:
    """The dtype DeepSpeed's engine keeps the model in for a resolved ``precision``.

    On a GPU that is the precision itself (DeepSpeed's bf16/fp16 modes).  On CPU a bf16 run keeps an
    fp32 engine and autocasts its forwards (:func:`forward_autocast`): fp32 weights, optimiser state,
    losses and scores, with bf16 matmuls where the CPU runs them natively."""
    return precision if device_type == "cuda" else "fp32"


def forward_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast around a rank's forwards: bf16 on a CPU bf16 run, nothing otherwise."""
    if device.type == "cpu":
        return numerics.autocast(device, precision)
    return contextlib.nullcontext()


def batch_layout(optim: PretrainOptimConfig, world_size: int) -> tuple[int, int, int]:
    """(micro batch per rank, accumulation steps, global batch) for ``world_size`` ranks."""
    micro = optim.micro_batch_size
    if optim.global_batch_size > 0:
        per_step = micro * world_size
        if optim.global_batch_size % per_step:
            raise ConfigError(f"optim.global_batch_size={optim.global_batch_size} is not a multiple of "
                              f"micro_batch_size x world size = {micro} x {world_size} = {per_step}")
        accum = optim.global_batch_size // per_step
    else:
        accum = optim.grad_accum
    return micro, accum, micro * accum * world_size


def lr_scheduler_factory(optim: PretrainOptimConfig) -> Callable[[Any], Any]:
    """What ``deepspeed.initialize(lr_scheduler=...)`` calls with the optimizer: the shared schedule
    (:func:`reolm.optim.lr_factor`) over ``optim.steps``.

    Ours rather than DeepSpeed's ``WarmupDecayLR``/``WarmupCosineLR``: those run the first two
    optimizer steps at lr 0 (they start one iteration behind and need at least two warmup steps),
    which matters for short runs and exact-trajectory tests.  The engine steps it after every
    applied update and saves/restores its state in checkpoints.
    """
    def factory(optimizer: Any) -> Any:
        return lr_schedule(optimizer, optim, optim.steps)
    return factory


def _set(node: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Replace ``auto`` (or a missing key); keep an equal literal; reject a conflicting one."""
    current = node.get(key, AUTO)
    if current == AUTO:
        node[key] = value
    elif current != value and not isinstance(value, (dict, list)):
        raise ConfigError(f"DeepSpeed config {where}.{key} = {current!r} contradicts the run config "
                          f"({value!r}); set it to \"auto\" in the JSON or change the run config")


def fill_ds_config(template: Mapping[str, Any], optim: PretrainOptimConfig, world_size: int, device_type: str,
                   zero_stage: int = -1, hidden_size: int | None = None) -> dict[str, Any]:
    """The template with every ``"auto"`` replaced; pure function, easy to test."""
    cfg = copy.deepcopy(dict(template))
    micro, accum, global_batch = batch_layout(optim, world_size)
    _set(cfg, "train_micro_batch_size_per_gpu", micro, "")
    _set(cfg, "gradient_accumulation_steps", accum, "")
    _set(cfg, "train_batch_size", global_batch, "")
    _set(cfg, "gradient_clipping", optim.grad_clip, "")

    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    for key, value in (("lr", optim.lr), ("betas", list(optim.betas)), ("eps", optim.eps),
                       ("weight_decay", optim.weight_decay), ("torch_adam", optim.torch_adam)):
        if params.get(key, AUTO) == AUTO:
            params[key] = value
    # "scheduler": {"type": "auto"} = our schedule (lr_scheduler_factory), passed to
    # deepspeed.initialize; a scheduler written out in the JSON is used as is.
    if cfg.get("scheduler", {}).get("type", AUTO) == AUTO:
        cfg.pop("scheduler", None)

    precision = engine_precision(resolve_precision(optim.precision, device_type, hidden_size), device_type)
    cfg.setdefault("bf16", {})["enabled"] = precision == "bf16"
    cfg.setdefault("fp16", {})["enabled"] = precision == "fp16"
    # fp32 gradient accumulation, stated explicitly (DeepSpeed's default follows the model dtype).
    cfg.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"

    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if zero_stage >= 0:
        zero["stage"] = zero_stage
    if hidden_size:
        # The usual HF heuristics for the size-dependent ZeRO-3 knobs.
        for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                           ("stage3_param_persistence_threshold", 10 * hidden_size)):
            if zero.get(key) == AUTO:
                zero[key] = value
    for key in [k for k, v in zero.items() if v == AUTO]:
        del zero[key]  # without a model size, let DeepSpeed use its defaults
    leftover = _find_auto(cfg)
    if leftover:
        raise ConfigError(f"DeepSpeed config still has \"auto\" at {', '.join(leftover)} (not a field we fill)")
    return cfg


def _find_auto(node: Any, path: str = "") -> list[str]:
    if node == AUTO:
        return [path or "<root>"]
    if isinstance(node, Mapping):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{path}[{i}]")]
    return []


def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dist.ds_config: DeepSpeed config not found: {path}")
    return read_json(path, ConfigError)


def write_ds_config(cfg: Mapping[str, Any], run_dir: str | os.PathLike) -> Path:
    """Save the resolved DeepSpeed config as RUN_DIR/ds_config.json (atomically)."""
    path = Path(run_dir) / "ds_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(cfg, indent=2) + "\n")
