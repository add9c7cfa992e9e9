"""One micro-step of pre-training: the batch stream of a rank, the forward of both sides, the losses.

Each micro-step encodes the histories (with MLM masking) and the targets of one packed
micro-batch (two forward passes through the same engine), computes
``InfoNCE(history, all targets of the group) + mlm_weight x MLM`` and calls
``engine.backward``; ``engine.step`` applies the update at the accumulation boundary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, Any, Iterator

from reolm.data.batch import TrainingBatch
from reolm.data.collate import SequenceExample
from reolm.model.objectives import mlm_predictions
from reolm.train import distributed as D
from reolm.train.data import StreamTracker, TrainStream, build_train_loader
from reolm.train.losses import PretrainLoss
from reolm.train.metrics import DeviceAccumulator, Window
from reolm.train.setup import TrainSetup, shard_list

__all__ = ["SeededCollate", "forward_losses", "train_batches", "micro_step", "consumed_log"]


class SeededCollate:
    """Collate with a per-batch masking RNG so a batch's masks depend only on (seed, batch id).

    This makes the data of a step independent of how ranks x accumulation split the global
    batch (``data.replicate_stream``) and makes resumed runs mask the same way.
    """

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, examples: list[SequenceExample], batch_seed: int) -> TrainingBatch:
        self.collator.reseed(batch_seed)
        return self.collator(examples)


def forward_losses(engine: Any, batch: TrainingBatch, loss_fn: PretrainLoss) -> Any:
    """Encode histories (with MLM) and targets, return the loss parts for one micro-batch.

    The losses read only the pooled vectors and the MLM hidden states (below the last layer), so
    both forwards are ``pooled_only``: with [CLS] pooling the last layer runs on the [CLS] rows
    alone.  Image features arrive as stored (float16); the model casts them to its own dtype."""
    history_out = engine(batch.history, pooled_only=True)
    target_out = engine(batch.target, pooled_only=True)
    mlm_logits, mlm_labels = mlm_predictions(engine.module, history_out, batch.history)
    return loss_fn(history_out.pooled, target_out.pooled, mlm_logits, mlm_labels, target_ids=batch.target_items)


def _this_ranks_batches(loader: Any, tracker: StreamTracker, replicate: bool,
                        info: D.DistInfo) -> Iterator[TrainingBatch]:
    """Micro-batches for this rank; with a replicated stream keep every world-th one."""
    for index, batch in enumerate(loader):
        tracker.update(batch.stream)
        if replicate and index % info.world_size != info.rank:
            continue
        yield batch


def train_batches(setup: TrainSetup, tracker: StreamTracker, generation: int) -> Iterator[TrainingBatch]:
    """This rank's endless stream of collated micro-batches (DataLoader over :class:`TrainStream`)."""
    cfg, info = setup.cfg, setup.info
    dataset = TrainStream(shard_list(cfg, "train", setup.corpus), SeededCollate(setup.collator),
                          setup.micro, setup.num_items, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                          num_workers=setup.num_workers, resample=cfg.data.resample,
                          shuffle_buffer=cfg.data.shuffle_buffer, shuffle_initial=cfg.data.shuffle_initial,
                          replicate=cfg.data.replicate_stream,
                          max_bad_logs=cfg.data.max_bad_sample_logs, start=dict(tracker.positions),
                          generation=generation,
                          expected_counts=setup.corpus.shard_counts() if setup.corpus is not None else None)
    pin = cfg.data.pin_memory == "true" or (cfg.data.pin_memory == "auto" and setup.device.type == "cuda")
    loader = build_train_loader(dataset, setup.num_workers, cfg.data.prefetch_factor, pin)
    return _this_ranks_batches(loader, tracker, cfg.data.replicate_stream, info)


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
    parts = forward_losses(engine, batch.to(setup.device), loss_fn)
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
