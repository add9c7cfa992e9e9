"""Pre-training samples: decoding one tar sample into a :class:`~reolm.data.collate.SequenceExample`,
and counting bad ones.

Bad samples (corrupt tar, undecodable json, unknown item index, too short a sequence, fewer
samples in a shard than its manifest says) are skipped by :class:`BadSampleCounter`, which
logs the first few and then only when the count doubles; the training stream
(:mod:`reolm.train.data`) and the validation reader (:func:`read_examples`) share it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander

from reolm.data.collate import SequenceExample

__all__ = ["DataError", "BAD_SAMPLE_KINDS", "BadSampleCounter", "tar_samples", "decode_example",
           "read_examples"]

# The stream's logger: bad-sample warnings are the data stream's, wherever they are counted.
log = logging.getLogger("reolm.train.data")


class DataError(ValueError):
    """The training data cannot be streamed as configured."""


# Kinds of bad samples: unreadable tar content, undecodable json, unknown item index, fewer than
# two items, and samples missing from a shard compared with the manifest's count.
BAD_SAMPLE_KINDS = ("tar", "decode", "index", "short", "truncated")


class BadSampleCounter:
    """A webdataset handler: count the exception by kind, log at a limited rate, continue."""

    def __init__(self, max_logs: int = 20, where: str = "") -> None:
        self.counts: dict[str, int] = {}
        self.events = 0  # a truncated shard is one event for many samples
        self.max_logs = max_logs
        self.where = where
        self._next_report = max_logs * 2
        self._count_checked: set[str] = set()  # shards already compared with the manifest

    def check_count(self, url: str, read: int, expected: int | None) -> None:
        """Compare a shard's readable samples with the manifest, once per shard and reader.

        A shorter shard counts its missing samples as "truncated" (once: a resampled stream
        draws the same shard again and again); a longer one only warns (a stale manifest).
        """
        if expected is None or read == expected or url in self._count_checked:
            return
        self._count_checked.add(url)
        if read < expected:
            self.record("truncated", f"{url}: only {read} of the manifest's {expected} samples are readable "
                                     f"(counted once; run `reolm verify` on the corpus)", n=expected - read)
        else:
            log.warning("%s holds %d samples, its manifest entry says %d (stale manifest?)%s",
                        url, read, expected, self.where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, kind: str, message: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n
        self.events += 1
        if self.events <= self.max_logs:
            log.warning("skipping bad sample (%s)%s: %s", kind, self.where, message[:300])
        elif self.events >= self._next_report:  # then only when the number of events doubles
            log.warning("%d bad samples skipped so far%s: %s", self.total, self.where, self.counts)
            self._next_report *= 2

    def __call__(self, exn: BaseException) -> bool:
        self.record("tar", f"{type(exn).__name__}: {exn}")
        return True


def tar_samples(url: str, handler: Callable[[BaseException], bool]) -> Iterator[dict[str, Any]]:
    """Samples (dicts of raw member bytes keyed by extension) of one tar file, in order."""
    with open(url, "rb") as stream:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from group_by_keys(files, handler=handler)


# ----------------------------------------------------------------------------- decoding

def decode_example(sample: dict[str, Any], num_items: int, counter: BadSampleCounter) -> SequenceExample | None:
    """Raw tar sample -> example (history -> target item, in one domain, of one user); None (counted)
    when the sample is bad.  The whole history is kept: the collator cuts it to the model's budget."""
    key = sample.get("__key__", "?")
    where = f"{sample.get('__url__', '?')}:{key}"
    try:
        record = json.loads(sample["json"])
        items = [int(i) for i in record["items"]]
        domain, user = int(record["domain"]), int(record["user"])
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
        counter.record("decode", f"{where}: {type(err).__name__}: {err}")
        return None
    if "target" in record:  # dev samples: the held-out item follows the train sequence
        items = items + [int(record["target"])]
    if len(items) < 2:
        counter.record("short", f"{where}: {len(items)} item(s), need a history and a target")
        return None
    bad = [i for i in items if not 0 <= i < num_items]
    if bad:
        counter.record("index", f"{where}: item index {bad[0]} outside [0, {num_items})")
        return None
    history = np.asarray(items[:-1], dtype=np.int64)
    source = sample.get("__source__")
    return SequenceExample(history, items[-1], domain, user, f"{source}/{key}" if source else key)


def read_examples(shards: Sequence[str], num_items: int, limit: int, counter: BadSampleCounter | None = None,
                  expected_counts: Mapping[str, int] | None = None) -> list[SequenceExample]:
    """The first ``limit`` good examples of ``shards`` in order (validation sets, tests).

    Bad data is handled as in the training stream: a missing or unreadable shard and bad
    samples are skipped and counted in ``counter``; a shard with fewer samples than
    ``expected_counts`` (the manifest) counts the missing ones once.
    """
    counter = counter or BadSampleCounter()
    expected = {os.path.abspath(k): v for k, v in (expected_counts or {}).items()}
    out: list[SequenceExample] = []
    for url in shards:
        read = 0
        try:
            for sample in tar_samples(url, counter):
                read += 1
                example = decode_example(sample, num_items, counter)
                if example is not None:
                    out.append(example)
                    if len(out) >= limit:
                        return out
        except OSError as err:  # missing or unreadable file: skip the shard, as training does
            counter(err)
        counter.check_count(url, read, expected.get(os.path.abspath(url)))
    return out
