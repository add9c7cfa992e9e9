"""The recommendation service without HTTP: a catalogue, a model and one worker thread.

Every request becomes a job on a queue. Items given by content are tokenised before they are
queued (:meth:`Service.tokenize`, in the HTTP layer's threads), so text never reaches the
worker. One worker thread takes the first queued job, waits up to ``batch_wait_ms`` for
more, and runs what it took as one batch:

1. the histories of every recommend job are encoded in one pass and searched together;
2. the new items of every add job are encoded in one pass;
3. adds, deletes and saves are applied in arrival order.

So concurrent requests share forward passes, the catalogue is only ever touched by one
thread (no locks around FAISS, which is not safe to add to while searching), and an add
acknowledged to a client is visible to every request sent after it (a request sent later is
in a later batch). Recommendations go first because none of them waits on the same batch's
changes (those are not acknowledged yet) and an add's encoding pass is the longest step; a
long add is encoded ``item_batch_size`` items at a time, and the recommendations queued
meanwhile are answered between those passes, so a 1,024-item add does not stall them.

A shared pass that raises is retried job by job, so a request that breaks the model or
the index fails alone and the rest of its batch is answered as if it had not been there.
A job whose client went away before the worker took it is dropped (its future was
cancelled); once taken, its future can no longer be cancelled, so the worker never meets a
cancelled future (``InvalidStateError``) while answering.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import ctypes.util
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import numpy as np

from reolm.data.tables import ImageFeatureTable, ItemTokenTable
from reolm.serve.catalogue import Catalogue, concat_tables, take_rows, tensor_rows
from reolm.serve.config import ServeConfig
from reolm.serve.index import normalise
from reolm.serve.model import ServingModel

__all__ = ["RequestError", "ItemSpec", "RecommendJob", "AddJob", "DeleteJob", "SaveJob", "Service"]

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the service cannot answer: HTTP ``status``, the offending ``field``, a message."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


@dataclass
class ItemSpec:
    """An item given by content: attributes (the index's attribute names) and an optional image feature.

    ``tokens`` is its token row, filled by :meth:`Service.tokenize` before the job is queued.
    """

    attributes: dict[str, str]
    image_feature: np.ndarray | None = None  # float [image_feature_dim]
    id: str | None = None
    tokens: ItemTokenTable | None = None


HistoryEntry = Union[str, ItemSpec]


@dataclass
class _Job:
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future, init=False)

    @property
    def cost(self) -> int:
        return 1


@dataclass
class RecommendJob(_Job):
    history: list[HistoryEntry]
    k: int
    exclude_history: bool = True

    @property
    def cost(self) -> int:
        return len(self.history)


@dataclass
class AddJob(_Job):
    items: list[ItemSpec]

    @property
    def cost(self) -> int:
        return len(self.items)


@dataclass
class DeleteJob(_Job):
    item_id: str


@dataclass
class SaveJob(_Job):
    pass


_STOP = object()
INTERNAL_ERROR = "internal error while answering this request (the server logged it)"


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Hand memory freed by the last forward pass back to the OS (glibc only).

    Encoding a batch of new items allocates tens of MB of activations on the worker thread;
    glibc keeps the freed blocks in that thread's arena, so a service taking adds all day grew
    to ~2x the memory of the same catalogue loaded from disk. Trimming costs well under a
    millisecond next to a forward pass over hundreds of items.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _fail(job: _Job, err: Exception) -> None:
    """Fail one job: a RequestError as it is, anything else as a 500 that does not echo its text."""
    if job.future.done():
        return
    if not isinstance(err, RequestError):
        err = RequestError(500, "", INTERNAL_ERROR)
    job.future.set_exception(err)


def _alone_on_failure(jobs: list, run: Callable[[list], None]) -> None:
    """``run`` the jobs together; if that raises, run them one at a time so that only the jobs
    that fail on their own get an error, and the others are answered as if they were alone."""
    if not jobs:
        return
    try:
        run(jobs)
        return
    except Exception as err:
        if len(jobs) == 1:
            if not isinstance(err, RequestError):
                log.exception("%s failed", type(jobs[0]).__name__)
            _fail(jobs[0], err)
            return
        log.warning("a shared pass over %d %ss failed; retrying them one by one", len(jobs), type(jobs[0]).__name__)
    for job in jobs:
        if job.future.done():
            continue
        try:
            run([job])
        except Exception as err:
            if not isinstance(err, RequestError):
                log.exception("%s failed", type(job).__name__)
            _fail(job, err)


class Service:
    """Owns the catalogue and the model; ``submit`` jobs from any thread, read ``stats`` anywhere."""

    def __init__(self, model: ServingModel, catalogue: Catalogue, cfg: ServeConfig):
        self.model, self.catalogue, self.cfg = model, catalogue, cfg
        self.queue: queue.Queue = queue.Queue()
        self.counters = {"batches": 0, "jobs": 0, "encode_passes": 0, "items_encoded": 0, "history_passes": 0,
                         "histories_encoded": 0, "busy_s": 0.0, "saves": 0}
        self.largest_batch = 0
        self.submitted = 0  # jobs queued so far; in flight = submitted - counters["jobs"]
        self.running = 0  # jobs of the batch the worker is processing right now
        self._pending: collections.deque = collections.deque()  # taken off the queue, not yet run (in order)
        self._worker = threading.Thread(target=self._run, name="reolm-serve-worker", daemon=True)
        self._stopped = threading.Event()
        self._worker.start()

    # ------------------------------------------------------------------ public
    def submit(self, job: _Job) -> concurrent.futures.Future:
        if self._stopped.is_set():
            raise RequestError(503, "service", "the service is shutting down")
        self.submitted += 1
        self.queue.put(job)
        return job.future

    def close(self, save: bool) -> bool:
        """Finish every queued job, stop the worker, then save if asked and anything changed."""
        if not self._stopped.is_set():
            self._stopped.set()
            self.queue.put(_STOP)
            self._worker.join()
        changes = self.catalogue.changes
        if save and changes:
            self.catalogue.save()
            self.counters["saves"] += 1
            log.info("saved %d changes to %s (revision %s)", changes, self.catalogue.folder,
                     self.catalogue.manifest["revision"])
            return True
        return False

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "largest_batch": self.largest_batch, "queued": self.queue.qsize() + len(self._pending),
                "in_flight": self.submitted - self.counters["jobs"],
                "unsaved_changes": self.catalogue.changes}

    # ------------------------------------------------------------------ worker
    def tokenize(self, specs: Sequence[ItemSpec]) -> None:
        """Fill each spec's token row (any thread; the HF fast tokenizer releases the GIL).

        Runs before the job is queued, so text that breaks the tokenizer fails its own request
        only (a RequestError naming no field beyond the request), never a shared batch.
        """
        if not specs:
            return
        try:
            table = self.model.tokenize([s.attributes for s in specs], self.catalogue.attributes)
        except Exception:
            log.exception("tokenising %d items failed", len(specs))
            raise RequestError(422, "attributes", "the item text could not be tokenised") from None
        for i, spec in enumerate(specs):
            spec.tokens = take_rows(table, np.asarray([i]))

    def _run(self) -> None:
        while True:
            job = self._pending.popleft() if self._pending else self.queue.get()
            if job is _STOP:
                return
            batch, stop = self._gather(job)
            self.running = len(batch)  # before the futures turn uncancellable: shutdown must wait from here
            taken = [j for j in batch if j.future.set_running_or_notify_cancel()]  # drop abandoned jobs
            started = time.perf_counter()
            try:
                self._process(taken)
            except Exception:  # a bug must fail these requests, not the service
                log.exception("batch of %d jobs failed", len(taken))
                for j in taken:
                    _fail(j, RuntimeError("batch failed"))
            finally:
                self.running = 0
            self.counters["busy_s"] += time.perf_counter() - started
            self.counters["batches"] += 1
            self.counters["jobs"] += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            if stop:
                return

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus whatever else arrives within ``batch_wait_ms``, up to ``max_batch_items``."""
        batch, cost = [first], first.cost
        deadline = time.perf_counter() + self.cfg.batch_wait_ms / 1000
        while cost < self.cfg.max_batch_items:
            remaining = deadline - time.perf_counter()
            try:
                if self._pending:
                    job = self._pending.popleft()
                else:
                    job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return batch, True
            batch.append(job)
            cost += job.cost
        return batch, False

    def _process(self, batch: list[_Job]) -> None:
        _alone_on_failure([j for j in batch if isinstance(j, RecommendJob)], self._recommend)
        encoded: dict[int, tuple] = {}
        adds = [j for j in batch if isinstance(j, AddJob)]
        _alone_on_failure(adds, lambda jobs: encoded.update(self._encode_new_items(jobs)))
        if adds:
            release_freed_memory()
        for job in batch:  # changes in arrival order
            if isinstance(job, RecommendJob) or job.future.done():
                continue
            try:
                job.future.set_result(self._apply(job, encoded))
            except Exception as err:  # this job fails (e.g. a save hits a full disk); the batch goes on
                if not isinstance(err, RequestError):
                    log.exception("%s failed", type(job).__name__)
                _fail(job, err)

    def _apply(self, job: _Job, encoded: dict[int, tuple]) -> dict[str, Any]:
        if isinstance(job, AddJob):
            return self._apply_add(job, *encoded[id(job)])
        if isinstance(job, DeleteJob):
            return self._apply_delete(job)
        self.catalogue.save()
        self.counters["saves"] += 1
        return {"saved": True, "revision": self.catalogue.manifest["revision"], "items": self.catalogue.num_items}

    # ------------------------------------------------------------------ items
    def content_of(self, specs: Sequence[ItemSpec]) -> tuple[ItemTokenTable, ImageFeatureTable]:
        """Token rows (tokenised like the catalogue) and image features of items given by content."""
        if any(s.tokens is None for s in specs):  # library callers that did not tokenise first
            self.tokenize([s for s in specs if s.tokens is None])
        tokens = concat_tables([s.tokens for s in specs]) if len(specs) > 1 else specs[0].tokens
        feats = np.zeros((len(specs), self.catalogue.image_dim), np.float16)
        has = np.zeros(len(specs), bool)
        for i, spec in enumerate(specs):
            if spec.image_feature is not None:
                feats[i], has[i] = spec.image_feature, True
        return tokens, ImageFeatureTable(feats, has)

    def _encode_new_items(self, adds: list[AddJob]) -> dict[int, tuple]:
        """Every add job's items encoded in one pass: job id -> (tokens, images, vectors)."""
        if not adds:
            return {}
        specs = [spec for job in adds for spec in job.items]
        tokens, images = self.content_of(specs)
        step, parts = self.cfg.item_batch_size, []
        for first in range(0, len(specs), step):  # the passes encode_items would run, one at a time
            rows = np.arange(first, min(first + step, len(specs)))
            parts.append(tensor_rows(self.model.encode_items(
                take_rows(tokens, rows), ImageFeatureTable(images.features[rows], images.has_image[rows]))))
            if first + step < len(specs):
                self._answer_waiting_recommends()  # a large add must not stall everyone else
        vectors = np.concatenate(parts)
        if not np.isfinite(vectors).all():  # raised, so the pass is retried per job and only this add fails
            raise ValueError("the model produced non-finite item vectors")
        self.counters["encode_passes"] += 1
        self.counters["items_encoded"] += len(specs)
        out, start = {}, 0
        for job in adds:
            rows = np.arange(start, start + len(job.items))
            out[id(job)] = (take_rows(tokens, rows), ImageFeatureTable(images.features[rows], images.has_image[rows]),
                            vectors[rows])
            start += len(job.items)
        return out

    def _answer_waiting_recommends(self) -> None:
        """Between the passes of a long add: answer the recommend jobs queued meanwhile.

        They cannot depend on the add (it is not acknowledged yet); everything else that was
        queued keeps its order in ``_pending`` for the next batches.
        """
        waiting = []
        while True:
            try:
                waiting.append(self.queue.get_nowait())
            except queue.Empty:
                break
        recommends = [j for j in waiting if isinstance(j, RecommendJob)]
        self._pending.extend(j for j in waiting if not isinstance(j, RecommendJob))
        _alone_on_failure([j for j in recommends if j.future.set_running_or_notify_cancel()], self._recommend)
        self.counters["jobs"] += len(recommends)

    def _apply_add(self, job: AddJob, tokens: ItemTokenTable, images: ImageFeatureTable,
                   vectors: np.ndarray) -> dict[str, Any]:
        added, replaced = self.catalogue.add([s.id for s in job.items], tokens, images, vectors)
        return {"added": added, "replaced": replaced, "items": self.catalogue.num_items}

    def _apply_delete(self, job: DeleteJob) -> dict[str, Any]:
        if not self.catalogue.delete(job.item_id):
            raise RequestError(404, "id", f"no item {job.item_id!r} in the index")
        return {"deleted": job.item_id, "items": self.catalogue.num_items}

    # ------------------------------------------------------------------ recommendations
    def _resolve(self, job: RecommendJob) -> tuple[list[int | ItemSpec], set[int]]:
        """History entries as catalogue rows or specs; the rows to exclude. Raises RequestError."""
        entries: list[int | ItemSpec] = []
        for i, entry in enumerate(job.history):
            if isinstance(entry, ItemSpec):
                entries.append(entry)
                continue
            row = self.catalogue.row_of(entry)
            if row is None:
                raise RequestError(422, f"history[{i}]", f"unknown item id {entry!r}")
            entries.append(row)
        live = self.catalogue.num_items
        if job.k > live:
            raise RequestError(422, "k", f"k={job.k} but the index holds {live} items")
        exclude = {e for e in entries if isinstance(e, int)} if job.exclude_history else set()
        return entries, exclude

    def _recommend(self, jobs: list[RecommendJob]) -> None:
        resolved = []
        for job in jobs:
            try:
                resolved.append((job, *self._resolve(job)))
            except RequestError as err:
                job.future.set_exception(err)
        if not resolved:
            return
        keep = self.model.max_history
        histories = [entries[-keep:] for _, entries, _ in resolved]
        tokens, images, local = self._history_tables(histories)
        vectors = tensor_rows(self.model.encode_histories(tokens, images, local))
        self.counters["history_passes"] += 1
        self.counters["histories_encoded"] += len(local)
        hits = self.catalogue.search(normalise(vectors), max(j.k for j, _, _ in resolved),
                                     [ex for _, _, ex in resolved], self.cfg.hnsw_ef_search, self.cfg.ivf_nprobe)
        ids, temperature = self.catalogue.ids, self.model.temperature
        finite = np.isfinite(vectors).all(axis=1)
        for (job, _, _), job_hits, ok in zip(resolved, hits, finite):
            if not ok:  # a history the model cannot encode must not rank by NaN
                log.error("history vector of a recommend job is not finite")
                _fail(job, RuntimeError("non-finite history vector"))
                continue
            job.future.set_result([(ids[row], score / temperature) for row, score in job_hits[:job.k]])

    def _history_tables(self, histories: list[list[int | ItemSpec]]
                        ) -> tuple[ItemTokenTable, ImageFeatureTable, list[list[int]]]:
        """One small table holding every row the histories use; histories as indices into it."""
        rows = sorted({e for h in histories for e in h if isinstance(e, int)})
        specs = [e for h in histories for e in h if isinstance(e, ItemSpec)]
        local_row = {row: i for i, row in enumerate(rows)}
        parts_tokens, parts_images = [], []
        if rows:
            t, im = self.catalogue.content(rows)
            parts_tokens.append(t)
            parts_images.append(im)
        if specs:
            t, im = self.content_of(specs)
            parts_tokens.append(t)
            parts_images.append(im)
        tokens = concat_tables(parts_tokens) if len(parts_tokens) > 1 else parts_tokens[0]
        images = ImageFeatureTable(np.concatenate([p.features for p in parts_images]),
                                   np.concatenate([p.has_image for p in parts_images]))
        local, next_spec = [], len(rows)
        for h in histories:
            out = []
            for e in h:
                if isinstance(e, int):
                    out.append(local_row[e])
                else:
                    out.append(next_spec)
                    next_spec += 1
            local.append(out)
        return tokens, images, local

