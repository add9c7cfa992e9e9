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
    SeededCollate      item-table lookups (memory-mapped token table + image features) and the
                       packing collator, its masking seeded per batch: a TrainingBatch, with the
                       stream state attached (``TrainingBatch.stream``, a StreamInfo)

The stream never ends: the number of steps is fixed by the run config, so every rank takes the
same number of steps whatever the shard sizes.  Bad samples (corrupt tar, undecodable json,
unknown item index, too short a sequence) are skipped by a counting handler that logs the first
few and then only when the count doubles; the counts travel with each batch to the trainer,
which reports them as metrics.

Samples, their decoding and the counting of bad ones are :mod:`reolm.train.samples` (its
names are importable from here too).  :func:`build_train_data` is the one builder of a rank's
batch stream; :func:`list_shards` the one way a run lists its train or dev shards.

Resume: each batch carries its worker's reading position *after* the samples it was built from
were read.  :class:`StreamTracker` keeps the position of the last batch consumed from each
worker and is checkpointed per rank (``state_dict``/``load_state_dict``, keyed by global stream
id); a resumed worker reopens that shard draw and skips to that offset.  Samples that were in the
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

from reolm.config import ConfigError
from reolm.data.batch import StreamInfo, TrainingBatch
from reolm.data.collate import PackedCollator, SequenceExample
from reolm.data.corpus import Corpus
from reolm.data.shards import ShardError
from reolm.train.config import DataConfig
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
    "list_shards",
    "default_num_workers",
    "Readers",
    "SeededCollate",
    "TrainStream",
    "build_train_data",
    "read_examples",
    "StreamTracker",
    "merge_stream_states",
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


def list_shards(data: DataConfig, split: str, corpus: Corpus | None) -> list[str]:
    """The train/dev shards: ``data.<split>_shards`` if given, else those the corpus manifest lists.

    A ConfigError when neither is set or none of the shards exists; a DataError when the
    manifest lists none (a missing shard among others is the reader's to skip and count)."""
    spec = data.train_shards if split == "train" else data.dev_shards
    if spec:
        shards = expand_shards(spec)
    elif corpus is not None:
        try:
            shards = corpus.shards(split)
        except ShardError as err:
            raise DataError(str(err)) from None
    else:
        raise ConfigError(f"data.corpus (or data.{split}_shards) must be set")
    missing = [s for s in shards if not os.path.exists(s)]
    if len(missing) == len(shards):
        raise ConfigError(f"none of the {len(shards)} {split} shards exists (e.g. {shards[0]})")
    return shards


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

@dataclass(frozen=True)
class Readers:
    """This rank's place among the run's shard readers (ranks x DataLoader workers).

    Readers are numbered rank-major.  With ``replicate`` every rank reads the same streams, so
    the rank does not count.  Checkpoints key reading positions by these global stream ids,
    which is what lets a resume on another layout re-split them.
    """

    rank: int
    world_size: int
    workers: int  # DataLoader workers of this rank; 0 = the rank reads in its own process
    replicate: bool

    @property
    def per_rank(self) -> int:
        """Streams this rank reads: one per worker, and one in-process stream without workers."""
        return max(self.workers, 1)

    @property
    def count(self) -> int:
        """Streams of the whole run (what ``data.resample=false`` splits the shards among)."""
        return self.per_rank * (1 if self.replicate else self.world_size)

    def stream_id(self, worker: int) -> int:
        return (0 if self.replicate else self.rank) * self.per_rank + worker

    def stream_ids(self) -> dict[int, int]:
        """worker -> global stream id of this rank's readers."""
        return {worker: self.stream_id(worker) for worker in range(self.per_rank)}


class SeededCollate:
    """Collate with a per-batch masking RNG so a batch's masks depend only on (seed, batch id).

    This makes the data of a step independent of how ranks x accumulation split the global
    batch (``data.replicate_stream``) and makes resumed runs mask the same way.
    """

    def __init__(self, collator: PackedCollator) -> None:
        self.collator = collator

    def __call__(self, examples: list[SequenceExample], batch_seed: int) -> TrainingBatch:
        self.collator.reseed(batch_seed)
        return self.collator(examples)


class TrainStream(torch.utils.data.IterableDataset):
    """The per-rank dataset; each DataLoader worker builds its own pipeline in ``__iter__``.

    ``start``: worker -> the position its stream continues from; ``generation``: the run's
    resume generation, which re-seeds the shuffle buffers and masks (they restart empty after a
    resume, so reusing the old sequence would not reproduce the order anyway).
    """

    def __init__(self, data: DataConfig, shards: Sequence[str],
                 collate: Callable[[list[SequenceExample], int], TrainingBatch], *, micro_batch: int,
                 num_items: int, seed: int, readers: Readers, start: Mapping[int, StreamPosition] | None = None,
                 generation: int = 0, expected_counts: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.data, self.shards, self.collate = data, list(shards), collate
        self.micro_batch, self.num_items, self.seed, self.readers = micro_batch, num_items, seed, readers
        self.start, self.generation = dict(start or {}), generation
        self.expected_counts = dict(expected_counts or {})
        # Validate the layout in the parent so the error is raised before workers start.
        if not data.resample and len(self.shards) < readers.count:
            ShardStream(self.shards, seed, 0, readers.count, data.resample, BadSampleCounter(0))

    def __iter__(self) -> Iterator[TrainingBatch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        sid = self.readers.stream_id(worker)
        counter = BadSampleCounter(self.data.max_bad_sample_logs,
                                   where=f" [rank {self.readers.rank} worker {worker}]")
        reader = ShardStream(self.shards, self.seed, sid, self.readers.count, self.data.resample, counter,
                             self.start.get(worker), self.expected_counts)
        shuffle_rng = random.Random(_seed(self.seed, sid, self.generation, 11))
        pipeline = wds.DataPipeline(
            lambda: iter(reader),
            wds.shuffle(self.data.shuffle_buffer, initial=self.data.shuffle_initial, rng=shuffle_rng)
            if self.data.shuffle_buffer > 1 else None,
            _decode_stage(self.num_items, counter),
            wds.batched(self.micro_batch, collation_fn=list, partial=False),
        )
        for index, examples in enumerate(pipeline):
            batch_seed = _seed(self.seed, sid, self.generation, index, 13)
            batch = self.collate(examples, batch_seed)
            yield dataclasses.replace(batch, stream=StreamInfo(worker, reader.position.draw, reader.position.offset,
                                                               dict(counter.counts)))


# ----------------------------------------------------------------------------- stream state

def merge_stream_states(states: Sequence[Mapping[str, Any]]) -> tuple[dict[int, dict[str, int]], dict[str, int]]:
    """Positions by global stream id and summed bad-sample counts over the saved ranks' states.

    A stream saved by several ranks (a replicated stream) keeps its furthest position, so no
    reader goes back over samples one of them already consumed.
    """
    positions: dict[int, dict[str, int]] = {}
    bad: dict[str, int] = {}
    for state in states:
        for sid, pos in state.get("streams", {}).items():
            pos = {"draw": int(pos["draw"]), "offset": int(pos["offset"])}
            old = positions.get(int(sid))
            if old is None or (pos["draw"], pos["offset"]) > (old["draw"], old["offset"]):
                positions[int(sid)] = pos
        for kind, n in state.get("bad", {}).items():
            bad[str(kind)] = bad.get(str(kind), 0) + int(n)
    return positions, bad


class StreamTracker:
    """Main-process view of this rank's workers: last consumed position and bad-sample counts per
    worker; checkpointed per rank (``rank-R.json``'s ``data``) by global stream id.

    Workers count from zero in every process; counts restored from a checkpoint are kept as a
    base so that the reported totals stay cumulative over resumptions.  Rank 0 also carries the
    ``dormant`` streams of a larger earlier layout (ids beyond this run's readers) from
    checkpoint to checkpoint, until a larger layout reads them again.
    """

    def __init__(self, readers: Readers, positions: Mapping[int, StreamPosition] | None = None,
                 base_bad: Mapping[str, int] | None = None) -> None:
        self.readers = readers
        self.positions: dict[int, StreamPosition] = dict(positions or {})
        self.base_bad: dict[str, int] = dict(base_bad or {})
        self.bad: dict[int, dict[str, int]] = {}
        self.dormant: dict[str, dict[str, int]] = {}

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

    def state_dict(self) -> dict[str, Any]:
        """Positions keyed by global stream id (dormant ones included) and bad-sample totals."""
        ids = self.readers.stream_ids()
        streams = {str(ids[w]): vars(p) for w, p in self.positions.items()}
        streams.update(self.dormant)
        return {"num_workers": self.readers.per_rank, "streams": streams, "bad": self.bad_counts()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the streams of ``state`` (by global stream id) that this rank's readers own.

        Ids beyond this layout's readers (the run shrank) stay dormant on rank 0; ids new to
        this layout (the run grew) start at their first draw, which nobody has read.
        """
        saved, bad = merge_stream_states([state])
        self.positions = {w: StreamPosition(**saved[sid]) for w, sid in self.readers.stream_ids().items()
                          if sid in saved}
        self.base_bad, self.bad = bad, {}
        self.dormant = ({str(sid): pos for sid, pos in saved.items() if sid >= self.readers.count}
                        if self.readers.rank == 0 else {})

    def reshard(self, saved: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """This rank's state from every rank's of a run with another layout: all streams merged by
        global stream id; the old bad-sample totals only on rank 0 (they are summed, once)."""
        positions, bad = merge_stream_states(saved)
        return {"streams": {str(sid): pos for sid, pos in positions.items()},
                "bad": bad if self.readers.rank == 0 else {}}


# ----------------------------------------------------------------------------- the builder

def build_train_data(data: DataConfig, corpus: Corpus | None, collator: PackedCollator, readers: Readers,
                     streams: StreamTracker, *, micro_batch: int, seed: int, generation: int,
                     device: torch.device) -> Iterator[TrainingBatch]:
    """This rank's endless stream of collated micro-batches, continuing where ``streams`` is.

    One DataLoader over a :class:`TrainStream` of ``list_shards(data, "train", corpus)``; each
    batch consumed updates ``streams``.  Closing the returned generator shuts the workers down.
    """
    dataset = TrainStream(data, list_shards(data, "train", corpus), SeededCollate(collator),
                          micro_batch=micro_batch, num_items=len(collator.tokens), seed=seed, readers=readers,
                          start=streams.positions, generation=generation,
                          expected_counts=corpus.shard_counts() if corpus is not None else None)
    pin = data.pin_memory == "true" or (data.pin_memory == "auto" and device.type == "cuda")
    loader = _loader(dataset, readers.workers, data.prefetch_factor, pin)
    return _this_ranks_batches(loader, streams, data.replicate_stream, readers)


def _loader(dataset: TrainStream, num_workers: int, prefetch_factor: int,
            pin_memory: bool) -> torch.utils.data.DataLoader:
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        # Workers ignore stop signals: the rank decides when to stop (and checkpoints first).
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=True,
                      multiprocessing_context="fork" if os.name == "posix" else None,
                      worker_init_fn=ignore_stop_signals_in_worker)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       pin_memory=pin_memory, **kwargs)


def _this_ranks_batches(loader: Any, streams: StreamTracker, replicate: bool,
                        readers: Readers) -> Iterator[TrainingBatch]:
    """Micro-batches for this rank; with a replicated stream keep every world-th one."""
    for index, batch in enumerate(loader):
        streams.update(batch.stream)
        if replicate and index % readers.world_size != readers.rank:
            continue
        yield batch
