"""Streaming pre-training data: WebDataset shards -> examples -> packed micro-batches.

One ``wds.DataPipeline`` per DataLoader worker, built from small stages (OpenCLIP style)::

    ShardStream        shard draws for this (rank, worker): resampled with replacement, or a
                       disjoint subset reshuffled every pass; reads tar samples and records the
                       reading position (draw index, sample offset) for exact resume
    wds.shuffle        shuffle buffer of RAW samples (bytes; nothing decoded yet)
    decode_example     json -> SequenceExample(history, target, domain, user, key), the history
                       whole (the collator cuts it); bad samples skipped + counted
    wds.batched        fixed-size lists of examples (partial batches dropped: every rank's
                       micro-batch has the same size, which the all-gather needs)
    CollateStage       item-table lookups (memory-mapped token table + image features) and the
                       packing collator: a TrainingBatch, with the stream state attached
                       (``TrainingBatch.stream``, a StreamInfo)

The stream never ends: the number of steps is fixed by the run config, so every rank takes the
same number of steps whatever the shard sizes.  Bad samples (corrupt tar, undecodable json,
unknown item index, too short a sequence) are skipped by a counting handler that logs the first
few and then only when the count doubles; the counts travel with each batch to the trainer,
which reports them as metrics.

Samples, their decoding and the counting of bad ones are :mod:`reolm.train.samples` (its
names are importable from here too).

Resume: each batch carries its worker's reading position *after* the samples it was built from
were read.  The trainer saves the position of the last batch it consumed from each worker; a
resumed worker reopens that shard draw and skips to that offset.  Samples that were in the
shuffle buffer at that moment are not re-read, so a resume replays nothing and skips at most one
shuffle buffer (plus the samples of batches prefetched but not consumed are read again, which
is not a replay since they were never trained on).
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import webdataset as wds

from reolm.data.batch import StreamInfo, TrainingBatch
from reolm.data.collate import SequenceExample
from reolm.data.corpus import Corpus
from reolm.data.shards import ShardError
from reolm.train.distributed import ignore_stop_signals_in_worker
from reolm.train.samples import (BAD_SAMPLE_KINDS, BadSampleCounter, DataError, decode_example, read_examples,
                                 tar_samples)

__all__ = [
    "DataError",
    "BadSampleCounter",
    "BAD_SAMPLE_KINDS",
    "ShardStream",
    "StreamPosition",
    "decode_example",
    "expand_shards",
    "open_corpus",
    "corpus_shards",
    "default_num_workers",
    "build_train_loader",
    "read_examples",
    "StreamTracker",
    "stream_id",
]


# ----------------------------------------------------------------------------- shard lists

def expand_shards(spec: str | Sequence[str], base: str | os.PathLike | None = None) -> list[str]:
    """Brace patterns / comma lists / lists -> shard paths (relative ones resolved against ``base``)."""
    if isinstance(spec, str):
        parts: list[str] = []
        for piece in spec.split(","):
            piece = piece.strip()
            if piece:
                parts.extend(wds.shardlists.expand_urls(piece))
    else:
        parts = list(spec)
    if base is not None:
        parts = [p if os.path.isabs(p) else str(Path(base) / p) for p in parts]
    return parts


def open_corpus(corpus: str | os.PathLike) -> Corpus:
    """The corpus ``data.corpus`` names, its manifest format-checked (a DataError naming the setting)."""
    try:
        return Corpus.open(corpus)
    except ShardError as err:
        raise DataError(f"data.corpus: {err}") from None


def corpus_shards(corpus: str | os.PathLike | Corpus, split: str) -> list[str]:
    """The ``split`` shards (train/dev) listed in a corpus manifest, as paths."""
    opened = corpus if isinstance(corpus, Corpus) else open_corpus(corpus)
    try:
        return opened.shards(split)
    except ShardError as err:
        raise DataError(str(err)) from None


def default_num_workers(local_world_size: int) -> int:
    """CPU cores of this node shared by its ranks; one core stays with the training process."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(local_world_size, 1) - 1))


# ----------------------------------------------------------------------------- shard stream

@dataclass
class StreamPosition:
    """Where a worker's reader is: the ``draw``-th shard of its sequence, ``offset`` samples in."""

    draw: int = 0
    offset: int = 0


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


class ShardStream:
    """Infinite sequence of tar samples for one (rank, worker), with a resumable position.

    ``resample=True``: draw ``k`` is a uniform choice seeded by (seed, stream, k), so the
    sequence is reproducible and can restart at any draw.  ``resample=False``: the stream owns
    ``shards[stream_id::num_streams]`` and walks them in a fresh permutation every pass.
    """

    def __init__(self, shards: Sequence[str], seed: int, stream_id: int, num_streams: int, resample: bool,
                 counter: BadSampleCounter, start: StreamPosition | None = None,
                 expected_counts: Mapping[str, int] | None = None) -> None:
        self.seed, self.stream_id, self.resample = seed, stream_id, resample
        self.counter = counter
        # Samples per shard from the manifest: a tar cut at a block boundary ends "cleanly" for
        # tarfile, so a short read is only visible against the expected count.
        self.expected = {os.path.abspath(k): v for k, v in (expected_counts or {}).items()}
        self.position = StreamPosition(**vars(start)) if start else StreamPosition()
        if resample:
            self.shards = list(shards)
        else:
            if len(shards) < num_streams:
                raise DataError(
                    f"{len(shards)} train shards for {num_streams} readers (ranks x workers): without "
                    f"resampling every reader needs at least one shard. Set data.resample=true, lower "
                    f"data.num_workers, or write more, smaller shards (`reolm shard --overwrite` with a "
                    f"smaller --max-count samples per shard or --max-size bytes per shard).")
            self.shards = list(shards)[stream_id::num_streams]

    def shard_for_draw(self, draw: int) -> str:
        if self.resample:
            return self.shards[random.Random(_seed(self.seed, self.stream_id, draw)).randrange(len(self.shards))]
        n = len(self.shards)
        order = random.Random(_seed(self.seed, self.stream_id, draw // n, 7)).sample(range(n), n)
        return self.shards[order[draw % n]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        empty_draws = 0
        while True:
            pos = self.position
            url = self.shard_for_draw(pos.draw)
            yielded = 0
            read = 0
            try:
                for index, sample in enumerate(tar_samples(url, self.counter)):
                    read = index + 1
                    if index < pos.offset:
                        continue  # resuming inside this shard: already read before the checkpoint
                    pos.offset = index + 1
                    yielded += 1
                    # Where the sample came from: stream, shard draw, and index in the shard.
                    sample["__source__"] = f"s{self.stream_id}/d{pos.draw}/i{index}"
                    yield sample
            except OSError as err:  # unreadable file (the expander handles corrupt tar content)
                self.counter(err)
            self.counter.check_count(url, read, self.expected.get(os.path.abspath(url)))
            empty_draws = 0 if yielded else empty_draws + 1
            if empty_draws > 10 * max(len(self.shards), 1):
                raise DataError(f"no readable samples in {len(self.shards)} shards (e.g. {url}); "
                                f"bad samples so far: {self.counter.counts}")
            self.position = StreamPosition(pos.draw + 1, 0)


def _decode_stage(num_items: int, counter: BadSampleCounter) -> Callable:
    def stage(src: Iterable[dict[str, Any]]) -> Iterator[SequenceExample]:
        for sample in src:
            example = decode_example(sample, num_items, counter)
            if example is not None:
                yield example
    return stage


# ----------------------------------------------------------------------------- pipeline

def stream_id(rank: int, worker: int, num_workers: int, replicate: bool) -> int:
    """The global id of the shard stream a (rank, worker) reads: readers are numbered rank-major.

    Replicated streams ignore the rank (every rank reads the same samples).  Checkpoints key
    reading positions by this id, which is what lets a resume on another layout re-split them.
    """
    return (0 if replicate else rank) * max(num_workers, 1) + worker


class TrainStream(torch.utils.data.IterableDataset):
    """The per-rank dataset; each DataLoader worker builds its own pipeline in ``__iter__``."""

    def __init__(self, shards: Sequence[str], collate: Callable[[list[SequenceExample], int], TrainingBatch],
                 micro_batch: int, num_items: int, *, seed: int, rank: int, world_size: int,
                 num_workers: int, resample: bool, shuffle_buffer: int, shuffle_initial: int,
                 replicate: bool = False, max_bad_logs: int = 20,
                 start: dict[int, StreamPosition] | None = None, generation: int = 0,
                 expected_counts: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.shards, self.collate, self.micro_batch = list(shards), collate, micro_batch
        self.num_items, self.seed, self.rank, self.world_size = num_items, seed, rank, world_size
        self.num_workers, self.resample, self.replicate = max(num_workers, 1), resample, replicate
        self.shuffle_buffer, self.shuffle_initial = shuffle_buffer, shuffle_initial
        self.max_bad_logs = max_bad_logs
        self.start, self.generation = start or {}, generation
        self.expected_counts = dict(expected_counts or {})
        # Validate the layout in the parent so the error is raised before workers start.
        streams = self.num_workers * (1 if replicate else world_size)
        if not resample and len(self.shards) < streams:
            ShardStream(self.shards, seed, 0, streams, resample, BadSampleCounter(0))

    def __iter__(self) -> Iterator[TrainingBatch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        sid = stream_id(self.rank, worker, self.num_workers, self.replicate)
        num_streams = self.num_workers * (1 if self.replicate else self.world_size)
        counter = BadSampleCounter(self.max_bad_logs, where=f" [rank {self.rank} worker {worker}]")
        reader = ShardStream(self.shards, self.seed, sid, num_streams, self.resample, counter,
                             self.start.get(worker), self.expected_counts)
        # The shuffle buffer's RNG also depends on the resume generation: after a resume the
        # buffer restarts empty, so reusing the old sequence would not reproduce the order anyway.
        shuffle_rng = random.Random(_seed(self.seed, sid, self.generation, 11))
        pipeline = wds.DataPipeline(
            lambda: iter(reader),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_initial, rng=shuffle_rng)
            if self.shuffle_buffer > 1 else None,
            _decode_stage(self.num_items, counter),
            wds.batched(self.micro_batch, collation_fn=list, partial=False),
        )
        for index, examples in enumerate(pipeline):
            batch_seed = _seed(self.seed, sid, self.generation, index, 13)
            batch = self.collate(examples, batch_seed)
            yield dataclasses.replace(batch, stream=StreamInfo(worker, reader.position.draw, reader.position.offset,
                                                               dict(counter.counts)))


class StreamTracker:
    """Main-process view of the workers: last consumed position and bad-sample counts per worker.

    Workers count from zero in every process; counts restored from a checkpoint are kept as a
    base so that the reported totals stay cumulative over resumptions.
    """

    def __init__(self, num_workers: int, positions: dict[int, StreamPosition] | None = None,
                 base_bad: dict[str, int] | None = None) -> None:
        self.num_workers = num_workers
        self.positions: dict[int, StreamPosition] = dict(positions or {})
        self.base_bad: dict[str, int] = dict(base_bad or {})
        self.bad: dict[int, dict[str, int]] = {}

    def update(self, stream: StreamInfo) -> None:
        worker = int(stream.worker)
        self.positions[worker] = StreamPosition(int(stream.draw), int(stream.offset))
        self.bad[worker] = dict(stream.bad)

    def bad_counts(self) -> dict[str, int]:
        total = dict(self.base_bad)
        for counts in self.bad.values():
            for kind, n in counts.items():
                total[kind] = total.get(kind, 0) + n
        return total

    def state(self, stream_ids: Mapping[int, int]) -> dict[str, Any]:
        """Positions keyed by global stream id (``stream_ids``: worker -> id) and bad-sample totals."""
        return {"num_workers": self.num_workers,
                "streams": {str(stream_ids[w]): vars(p) for w, p in self.positions.items()},
                "bad": self.bad_counts()}


def build_train_loader(dataset: TrainStream, num_workers: int, prefetch_factor: int,
                       pin_memory: bool) -> torch.utils.data.DataLoader:
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        # Workers ignore stop signals: the rank decides when to stop (and checkpoints first).
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=True,
                      multiprocessing_context="fork" if os.name == "posix" else None,
                      worker_init_fn=ignore_stop_signals_in_worker)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       pin_memory=pin_memory, **kwargs)


