"""The pre-training loop: ``run(cfg)`` is what ``launch/pretrain.py`` calls on every rank.

Every rank takes exactly ``optim.steps`` optimizer steps of ``accum`` micro-steps each
(:mod:`reolm.train.step`); the data stream never ends.  After each step the loop logs
(:mod:`reolm.train.metrics`), validates (:mod:`reolm.train.validation`) and checkpoints
(:class:`~reolm.train.state.TrainerState`) on their schedules, and stops early, with a
checkpoint, when a stop signal was agreed on.  What is built before the first step is
:mod:`reolm.train.setup`; what a checkpoint holds is registered once (:mod:`reolm.train.state`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from reolm.runtime import FreedMemoryBound
from reolm.train import distributed as D
from reolm.train.checkpoint_files import complete_checkpoints
from reolm.train.config import PretrainConfig
from reolm.train.data import BAD_SAMPLE_KINDS, StreamTracker, build_train_data
from reolm.train.losses import PretrainLoss
from reolm.train.metrics import (DeviceAccumulator, MetricsWriter, Progress, Window, move_rows_after,
                                 peak_device_tflops, window_metrics)
from reolm.train.runstate import claim_run_dir, mark_running, write_status
from reolm.train.setup import TrainSetup, build_setup
from reolm.train.state import TrainerState, register_run_state, resume
from reolm.train.step import consumed_log, micro_step
from reolm.train.stopsignal import restore_default_action
from reolm.train.validation import validate, validation_set

__all__ = ["run", "TrainingAborted", "NonFiniteGuard"]

log = logging.getLogger("reolm.train")


class TrainingAborted(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""


class NonFiniteGuard:
    """Counts optimizer steps DeepSpeed skipped for a non-finite gradient; aborts after N in a row.

    DeepSpeed's ZeRO optimizers check the gradient for inf/NaN before every update (the overflow
    check, and the invalid-norm check when clipping) and skip it; ``engine.was_step_applied()``
    reports that without another device sync.
    """

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0

    def update(self, applied: bool, step: int) -> bool:
        """Record one optimizer step; returns True when it was skipped."""
        if applied:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        log.warning("step %d skipped: non-finite loss or gradient (%d in a row)", step, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingAborted(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient (last at step "
                f"{step}); aborting. Lower optim.lr, check the data, or use bf16 instead of fp16 "
                f"(optim.precision).")
        return True


def _peak_tflops(setup: TrainSetup) -> float | None:
    """Peak device TFLOP/s for MFU: the GPU's tensor-core peak in bf16/fp16, else only a configured one."""
    flag = setup.cfg.log.peak_tflops
    return peak_device_tflops(flag) if setup.rank.precision in ("bf16", "fp16") else (flag or None)


def _log_window(step: int, acc: DeviceAccumulator, window: Window, setup: TrainSetup, streams: StreamTracker,
                peak: float | None, writer: MetricsWriter, state: TrainerState) -> dict[str, Any]:
    """Read the window's sums to the host (one transfer), derive rates, write JSONL/TB."""
    engine = setup.engine
    elapsed = window.elapsed()
    totals, bad_by_kind = window.totals(streams.bad_counts(), BAD_SAMPLE_KINDS, setup.rank.device)
    micro_steps = max(acc.count, 1)
    sums = acc.pop()
    state.tokens += int(totals[0])
    grad_norm = engine.get_global_grad_norm()
    values = window_metrics(sums, micro_steps=micro_steps, ranks=setup.rank.info.world_size, totals=totals,
                            elapsed=elapsed, lr=engine.get_lr()[0],
                            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                            counters={"skipped_steps": state.skipped_steps, "samples_seen": state.samples,
                                      "tokens_seen": state.tokens},
                            bad_by_kind=bad_by_kind, peak_tflops=peak)
    writer.write(step, values)
    return values


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Pre-train as configured; returns the last logged metrics (every rank)."""
    # Before the (long) setup, so that a stop signal during it is remembered, not fatal.
    stop = D.StopFlag() if cfg.ckpt.save_on_signal else None
    if stop is None:
        restore_default_action()
    cfg = claim_run_dir(cfg, complete_checkpoints(cfg.checkpoint_dir()))
    setup = build_setup(cfg)
    engine, main = setup.engine, setup.rank.info.rank == 0
    state, streams = TrainerState(), StreamTracker(setup.rank.readers)
    register_run_state(setup, state, streams)
    resume(setup)
    if main:
        # Rows the interrupted run logged after the checkpoint would repeat steps: move them aside.
        move_rows_after(Path(cfg.run_dir) / "metrics.jsonl", state.step)
    batches = build_train_data(cfg.data, setup.inputs.corpus, setup.inputs.collator, setup.rank.readers, streams,
                               micro_batch=setup.batch.micro, seed=cfg.seed, generation=state.generation,
                               device=setup.rank.device)
    val_set = validation_set(setup)

    loss_fn = PretrainLoss(cfg.model.temperature, cfg.loss.mlm_weight, cfg.loss.negatives,
                           cfg.loss.mask_duplicate_targets)
    writer = MetricsWriter(cfg.run_dir, main, cfg.log.tensorboard)
    progress = Progress(main and cfg.log.progress, cfg.optim.steps, state.step)
    acc = DeviceAccumulator()
    peak = _peak_tflops(setup)
    guard = NonFiniteGuard(cfg.optim.max_skipped_steps)
    consumed = consumed_log(cfg.run_dir, setup.rank.info.rank) if cfg.data.record_keys else None
    window = Window()
    host_memory = FreedMemoryBound()
    last: dict[str, Any] = {}
    engine.train()

    start_step = state.step
    if main:
        mark_running(cfg, start_step)
    try:
        while state.step < cfg.optim.steps:
            for _ in range(setup.batch.accum):
                micro_step(setup, batches, loss_fn, window, acc, consumed, state.step + 1)
            state.step += 1
            step = state.step
            host_memory.check()
            if guard.update(engine.was_step_applied(), step):
                state.skipped_steps += 1
            state.samples += setup.batch.micro * setup.batch.accum * setup.rank.info.world_size
            progress.update(1)

            stopping = stop is not None and stop.agreed()
            final = step == cfg.optim.steps
            save_now = final or stopping or bool(cfg.ckpt.every and step % cfg.ckpt.every == 0)
            # Log before every checkpoint too, so the saved counters (tokens seen) are exact.
            if step % cfg.log.every == 0 or save_now:
                last = _log_window(step, acc, window, setup, streams, peak, writer, state)
                progress.update(0, loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
                window = Window()
            if val_set is not None and cfg.val.every and (step % cfg.val.every == 0 or final):
                t0 = time.perf_counter()
                metrics = validate(setup, *val_set)
                writer.write(step, metrics, kind="val")
                last.update(metrics)
                window.excluded += time.perf_counter() - t0
            if save_now:
                if main and (final or stopping):  # before the save: a launcher may kill us right after it
                    write_status(cfg.run_dir, "finished" if final else "stopped", step, start_step,
                                 stop.reason if stopping and stop else "")
                t0 = time.perf_counter()
                setup.checkpoints.manager.save(engine, state.step)
                window.excluded += time.perf_counter() - t0
            if stopping and not final:
                if main:
                    log.warning("stopped after step %d (%s); checkpoint saved, continue with "
                                "--resume latest", step, stop.reason)
                last["stopped_at"] = step
                break
    finally:
        batches.close()  # shut the DataLoader workers down now (they ignore stop signals)
        progress.close()
        writer.close()
        if consumed is not None:
            consumed.close()
    return last
