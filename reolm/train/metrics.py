"""Training metrics: device-side accumulation, throughput/MFU, JSONL + TensorBoard + tqdm.

Between logging steps the trainer only *adds* device tensors (:class:`DeviceAccumulator`) and
host-side Python numbers (token counts come from the collator as ints, so they never touch the
device); values are read to the host (``.tolist()``) once per logging step.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from reolm.data.batch import TrainingBatch
from reolm.io import write_text

__all__ = ["DeviceAccumulator", "MetricsWriter", "Window", "Progress", "window_metrics", "move_rows_after",
           "peak_device_tflops", "peak_memory_gib", "GPU_PEAK_TFLOPS"]

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' datasheets.
# Matched as substrings of torch.cuda.get_device_name(), most specific first.
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("V100", 125.0),
)


def peak_device_tflops(flag: float = 0.0) -> float | None:
    """Peak TFLOP/s of one device: the flag if set, else the GPU table; None on CPU/unknown GPUs."""
    if flag > 0:
        return flag
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in GPU_PEAK_TFLOPS:
        if key in name:
            return value
    return None


def peak_memory_gib() -> float:
    """Peak device memory on GPU; peak resident set size of the process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kib / 2**20 if sys.platform != "darwin" else rss_kib / 2**30


class DeviceAccumulator:
    """Sums of device scalars between logging steps (no host sync until :meth:`pop`)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, **values: torch.Tensor) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1

    def pop(self, reduce_over_ranks: bool = True) -> dict[str, float]:
        """Sums over micro-steps (and ranks), read to the host in ONE transfer, then reset."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys])
        if reduce_over_ranks and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(stacked)
        values = stacked.tolist()
        self.sums, self.count = {}, 0
        return dict(zip(keys, values))


def move_rows_after(path: str | os.PathLike, step: int) -> int:
    """Move the rows of ``path`` (metrics.jsonl) logged after ``step`` to ``<name>.after-resume.jsonl``.

    A run killed after its last checkpoint logged steps that the resumed run takes again; they
    are kept aside (appended, nothing is lost) so the file's steps stay monotonic.  A line that
    is not JSON (a write cut by the kill) goes aside too.  Returns the number of rows moved.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    keep, aside = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row_step = json.loads(line)["step"]
            (keep if isinstance(row_step, int) and row_step <= step else aside).append(line)
        except (ValueError, KeyError, TypeError):
            aside.append(line)
    if not aside:
        return 0
    with open(path.with_name(path.stem + ".after-resume.jsonl"), "a") as out:
        out.write("".join(line + "\n" for line in aside))
    write_text(path, "".join(line + "\n" for line in keep))
    return len(aside)


class MetricsWriter:
    """Rank 0 writes ``RUN_DIR/metrics.jsonl`` and TensorBoard events; other ranks write nothing."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but keep training if it is broken
                self._tb = None

    def write(self, step: int, values: Mapping[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3)}
        record.update({k: _clean(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return value


# ----------------------------------------------------------------------------- logging windows

class Window:
    """Host-side counters of one logging window (Python numbers only: no device syncs)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.wait = 0.0       # waiting for the next batch
        self.excluded = 0.0   # validation and checkpoint time, not part of the throughput
        self.tokens = 0
        self.sequences = 0
        self.flops = 0.0

    def count_batch(self, batch: TrainingBatch, module: Any) -> None:
        self.tokens += batch.num_real_tokens  # history + target
        self.sequences += batch.num_sequences
        # Analytic model FLOPs from the batch's Python ints, of the pooled_only forwards training runs.
        self.flops += (module.training_flops(batch.history, pooled_only=True)
                       + module.training_flops(batch.target, include_mlm=False, pooled_only=True))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def totals(self, bad: Mapping[str, int], kinds: Sequence[str], device: torch.device
               ) -> tuple[list[float], dict[str, int]]:
        """([tokens, sequences, flops, data wait], {kind: bad samples}) summed over ranks in one collective."""
        local = torch.tensor([self.tokens, self.sequences, self.flops, self.wait]
                             + [bad.get(kind, 0) for kind in kinds], dtype=torch.float64)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            local_dev = local.to(device)
            torch.distributed.all_reduce(local_dev)
            local = local_dev.cpu()
        values = local.tolist()
        return values[:4], {kind: int(n) for kind, n in zip(kinds, values[4:])}


def window_metrics(sums: Mapping[str, float], *, micro_steps: int, ranks: int, totals: Sequence[float],
                   elapsed: float, lr: float, grad_norm: float, counters: Mapping[str, int],
                   bad_by_kind: Mapping[str, int], peak_tflops: float | None) -> dict[str, Any]:
    """The row of one logging window: losses and accuracies from the summed device values, rates
    from the host ``totals`` (tokens, sequences, flops, data wait; summed over ranks), then the
    run's ``counters`` and the bad samples skipped by kind."""
    tokens, sequences, flops, wait = totals
    tflops_per_device = flops / max(elapsed, 1e-9) / ranks / 1e12
    values: dict[str, Any] = {
        # Mean over micro-steps and ranks of each rank's share = the mean group loss.
        "loss": sums["loss"] / micro_steps / ranks,
        "loss_contrastive": sums["loss_contrastive"] / micro_steps / ranks,
        "loss_mlm": sums["loss_mlm"] / micro_steps / ranks,
        "contrastive_accuracy": sums["contrastive_correct"] / max(sequences, 1),
        "mlm_accuracy": sums["mlm_correct"] / max(sums["mlm_tokens"], 1),
        "lr": lr,
        "grad_norm": grad_norm,
        "samples_per_s": sequences / max(elapsed, 1e-9),
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "tflops_per_device": tflops_per_device,
        "data_wait_share": wait / ranks / max(elapsed, 1e-9),
        "peak_memory_gib": peak_memory_gib(),
        "skipped_samples": int(sum(bad_by_kind.values())),
        **counters,
    }
    if peak_tflops:
        values["mfu"] = tflops_per_device / peak_tflops
    values.update({f"skipped_samples_{kind}": int(n) for kind, n in bad_by_kind.items() if n})
    return values


class Progress:
    """A tqdm bar of optimizer steps on rank 0 (nothing elsewhere or when disabled)."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="pre-training", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
