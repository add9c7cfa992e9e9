"""One micro-step of pre-training: the forward of both sides, the losses, backward and DeepSpeed's step.

Each micro-step encodes the histories (with MLM masking) and the targets of one packed
micro-batch (two forward passes through the same engine), computes
``InfoNCE(history, all targets of the group) + mlm_weight x MLM`` and calls
``engine.backward``; ``engine.step`` applies the update at the accumulation boundary.  The batches
come from :func:`reolm.train.data.build_train_data`.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import IO, Any, Iterator

from reolm.data.batch import TrainingBatch
from reolm.model.objectives import mlm_predictions
from reolm.train.losses import PretrainLoss
from reolm.train.metrics import DeviceAccumulator, Window
from reolm.train.setup import TrainSetup

__all__ = ["forward_losses", "micro_step", "consumed_log"]


def forward_losses(engine: Any, batch: TrainingBatch, loss_fn: PretrainLoss,
                   autocast: AbstractContextManager | None = None) -> Any:
    """Encode histories (with MLM) and targets, return the loss parts for one micro-batch.

    The losses read only the pooled vectors and the MLM hidden states (below the last layer), so
    both forwards are ``pooled_only``: with [CLS] pooling the last layer runs on the [CLS] rows
    alone.  Image features arrive as stored (float16); the model casts them to its own dtype.
    ``autocast`` (the rank's, :meth:`RankContext.autocast`) wraps the forwards only: the losses
    score in fp32 either way."""
    with autocast or nullcontext():
        history_out = engine(batch.history, pooled_only=True)
        target_out = engine(batch.target, pooled_only=True)
        mlm_logits, mlm_labels = mlm_predictions(engine.module, history_out, batch.history)
    return loss_fn(history_out.pooled, target_out.pooled, mlm_logits, mlm_labels, target_ids=batch.target_items)


def micro_step(setup: TrainSetup, batches: Iterator[TrainingBatch], loss_fn: PretrainLoss, window: Window,
               acc: DeviceAccumulator, consumed: IO[str] | None, step: int) -> None:
    """Fetch one micro-batch, forward both sides, backward, and let DeepSpeed step/accumulate."""
    engine = setup.engine
    t0 = time.perf_counter()
    batch = next(batches)
    window.wait += time.perf_counter() - t0
    window.count_batch(batch, engine.module)
    if consumed is not None:
        consumed.write("".join(f"{step}\t{k}\n" for k in batch.keys))
    parts = forward_losses(engine, batch.to(setup.rank.device), loss_fn, setup.rank.autocast())
    engine.backward(parts.total)
    engine.step()
    acc.add(loss=parts.total.detach(), loss_contrastive=parts.contrastive, loss_mlm=parts.mlm,
            contrastive_correct=parts.contrastive_correct, mlm_tokens=parts.mlm_tokens,
            mlm_correct=parts.mlm_correct)


def consumed_log(run_dir: str, rank: int) -> IO[str]:
    """RUN_DIR/consumed/rank-R.tsv, appended line-buffered: the audit trail of ``data.record_keys``."""
    folder = Path(run_dir) / "consumed"
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / f"rank-{rank:05d}.tsv", "a", buffering=1)
