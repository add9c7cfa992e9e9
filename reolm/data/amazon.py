"""Amazon Reviews 2018 per-category files -> a processed domain folder.

Inputs (https://nijianmo.github.io/amazon/index.html, the files the paper used):

* reviews: ``<Category>_5.json.gz`` (5-core) or ``<Category>.json.gz`` (all reviews), one JSON
  object per line with ``reviewerID``, ``asin``, ``unixReviewTime`` (plus text we do not need);
* metadata: ``meta_<Category>.json.gz``, one object per line with ``asin``, ``title``, ``brand``,
  ``category`` (a list, top level first), ``imageURLHighRes`` / ``imageURL`` (lists).  Some
  published dumps write Python literals (single quotes) instead of JSON: both are accepted.

Memory stays bounded by the *kept* data, not the file: the reviews pass keeps three integers per
interaction (user index, item index, time: 16 bytes) plus one string per distinct user / item;
the metadata pass parses only the lines of items that occur in the reviews and keeps three short
strings per such item.  Everything after that is numpy over the integer arrays.

Processing (each step an explicit option of :class:`AmazonOptions`, counted in the report):

1. drop malformed lines (file:line is reported) and reviews lacking a required field;
2. drop metadata without a title (``require_title``), unescape HTML entities (``unescape_html``);
3. drop interactions whose item has no (titled) metadata;
4. duplicates: ``exact`` drops repeated (user, item, time) triples, ``user-item`` keeps only a
   user's earliest interaction with an item, ``keep`` keeps everything;
5. iterative k-core: every user >= ``user_k`` and every item >= ``item_k`` interactions;
6. chronological order per user, ties broken by file order (a stable sort);
7. leave-one-out: last item -> test, second to last -> val, the rest -> train.

Index order: users by first appearance in the reviews file, items by first appearance in the
chronologically ordered interactions (UniSRec's convention); both 0-based and dense.
"""

from __future__ import annotations

import ast
import gzip
import html
import io
import json
import os
import re
import zlib
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from reolm.data.domain import DEFAULT_ATTRIBUTES, Domain
from reolm.data.ingest_report import IngestReport

__all__ = ["AmazonOptions", "IngestError", "RawItems", "ReviewLog", "build_amazon_domain", "iter_raw_lines",
           "parse_record", "read_meta", "read_reviews", "render_category", "clean_text"]

DUPLICATE_POLICIES = ("keep", "exact", "user-item")
CATEGORY_STYLES = ("full", "drop-top")
_PROGRESS_EVERY = 1 << 16  # lines between progress-bar updates (tqdm per line would cost ~30%)
# Cheap pre-filter: the asin of a metadata line, found without parsing the (long) line.
_ASIN_RE = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")
_SPACES_RE = re.compile(r"\s+")


class IngestError(ValueError):
    """Raw input cannot be ingested (the message names the file and line)."""


@dataclass
class AmazonOptions:
    """The Recformer/UniSRec-style filters, made explicit (see the module docstring)."""

    require_title: bool = True
    unescape_html: bool = True
    user_k: int = 5
    item_k: int = 5
    duplicates: str = "exact"
    category: str = "full"
    allow_truncated: bool = False
    keep_image_urls: bool = False

    def check(self) -> None:
        if self.user_k < 3:
            raise IngestError(f"user_k={self.user_k}: leave-one-out needs at least 3 interactions per user "
                              f"(train >= 1, val, test)")
        if self.item_k < 0:
            raise IngestError(f"item_k={self.item_k} must be >= 0")
        if self.duplicates not in DUPLICATE_POLICIES:
            raise IngestError(f"duplicates={self.duplicates!r}: choose one of {DUPLICATE_POLICIES}")
        if self.category not in CATEGORY_STYLES:
            raise IngestError(f"category={self.category!r}: choose one of {CATEGORY_STYLES}")


# ----------------------------------------------------------------------------- raw lines

def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def iter_raw_lines(path: str | os.PathLike, report: IngestReport, allow_truncated: bool = False,
                   desc: str = "") -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` of a gzip or plain UTF-8 text file, streaming.

    Text mode splits lines in C (much faster than GzipFile.readline); undecodable bytes become
    U+FFFD, so such a line fails to parse and is reported instead of stopping the run.

    A truncated or corrupt gzip stream raises :class:`IngestError` saying how many lines were
    read; with ``allow_truncated`` the lines before the damage are kept and the report notes it.
    """
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"no such file: {path}")
    lineno = 0
    with open(path, "rb") as raw, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                       desc=desc or path.name, leave=False, mininterval=1.0) as bar:
        binary = gzip.GzipFile(fileobj=raw, mode="rb") if _is_gzip(path) else raw
        stream = io.TextIOWrapper(binary, encoding="utf-8", errors="replace", newline="\n")
        try:
            for line in stream:
                lineno += 1
                if lineno % _PROGRESS_EVERY == 0:
                    bar.update(raw.tell() - bar.n)
                yield lineno, line
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            message = f"{path}: the compressed data ends or is corrupt after line {lineno:,} ({err})"
            if not allow_truncated:
                raise IngestError(message + "; pass --allow-truncated to keep the lines read before it") from None
            report.note(message + "; kept the lines read before it (--allow-truncated)")
            report.read[f"truncated:{path.name}"] = lineno
        bar.update(bar.total - bar.n)


def parse_record(line: str) -> dict[str, Any] | None:
    """A JSON object, else a Python-literal dict (older dumps), else ``None`` (malformed)."""
    try:
        record = json.loads(line)
    except ValueError:
        try:
            record = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            return None
    return record if isinstance(record, dict) else None


# ----------------------------------------------------------------------------- text

def clean_text(value: Any, unescape_html: bool = True) -> str:
    """One attribute value as clean text: lists joined by spaces, entities unescaped, spaces collapsed."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(clean_text(v, unescape_html) for v in value)
    text = str(value)
    if unescape_html:
        text = html.unescape(text)
    return _SPACES_RE.sub(" ", text).strip()


def render_category(value: Any, style: str = "full", unescape_html: bool = True) -> str:
    """The category attribute as Recformer renders it: the category path joined by spaces.

    ``style="drop-top"`` drops the first (top-level) entry, which is the same for every item of a
    per-category file and so carries no information within a domain; repeated entries are dropped
    too (some 2018 metadata lists repeat a level).
    """
    if value is None:
        return ""
    parts = [clean_text(v, unescape_html) for v in (value if isinstance(value, (list, tuple)) else [value])]
    parts = [p for p in parts if p]
    if style == "drop-top":
        parts = list(dict.fromkeys(parts[1:] if len(parts) > 1 else parts))
    return " ".join(parts)


# ----------------------------------------------------------------------------- reviews

@dataclass
class ReviewLog:
    """Interactions as three parallel integer arrays, plus the string -> index maps."""

    users: array = field(default_factory=lambda: array("i"))
    items: array = field(default_factory=lambda: array("i"))
    times: array = field(default_factory=lambda: array("q"))
    user_ids: dict[str, int] = field(default_factory=dict)
    item_ids: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)


def read_reviews(path: str | os.PathLike, report: IngestReport, allow_truncated: bool = False) -> ReviewLog:
    """Stream a reviews file, keeping (user, item, time) integers per interaction."""
    log = ReviewLog()
    user_ids, item_ids = log.user_ids, log.item_ids
    add_user, add_item, add_time = log.users.append, log.items.append, log.times.append
    loads = json.loads
    n_lines = 0
    for lineno, line in iter_raw_lines(path, report, allow_truncated, desc="reviews"):
        if not line.strip():
            continue
        n_lines += 1
        try:
            record = loads(line)  # the fast path; parse_record adds the Python-literal fallback
        except ValueError:
            record = parse_record(line)
        if not isinstance(record, dict):
            report.drop("malformed_review_line", f"{path}:{lineno}")
            continue
        user, asin, time = record.get("reviewerID"), record.get("asin"), record.get("unixReviewTime")
        if not (isinstance(user, str) and user and isinstance(asin, str) and asin
                and isinstance(time, (int, float, str))):
            report.drop("review_missing_field", f"{path}:{lineno} (needs reviewerID, asin, unixReviewTime)")
            continue
        try:
            time = int(time)
        except ValueError:
            report.drop("review_missing_field", f"{path}:{lineno} (unixReviewTime {time!r} is not an integer)")
            continue
        u = user_ids.get(user)
        if u is None:
            u = user_ids[user] = len(user_ids)
        i = item_ids.get(asin)
        if i is None:
            i = item_ids[asin] = len(item_ids)
        add_user(u)
        add_item(i)
        add_time(time)
    report.read["review_lines"] += n_lines
    return log


# ----------------------------------------------------------------------------- metadata

@dataclass
class RawItems:
    """Metadata of the reviewed items, keyed by the reviews' item index."""

    attributes: dict[int, dict[str, str]] = field(default_factory=dict)
    image_urls: dict[int, tuple[str, ...]] = field(default_factory=dict)


def _image_urls(record: dict[str, Any]) -> tuple[str, ...]:
    """The item's first high-resolution and first regular image URL (img2dataset join keys)."""
    urls = []
    for key in ("imageURLHighRes", "imageURL"):
        value = record.get(key)
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            urls.extend(u for u in value[:1] if isinstance(u, str) and u)
    return tuple(urls)


def read_meta(path: str | os.PathLike, wanted: dict[str, int], options: AmazonOptions,
              report: IngestReport) -> RawItems:
    """Stream a metadata file, parsing only the lines of items in ``wanted`` (asin -> index)."""
    items = RawItems()
    n_lines = n_unreviewed = 0
    for lineno, line in iter_raw_lines(path, report, options.allow_truncated, desc="metadata"):
        if not line.strip():
            continue
        n_lines += 1
        match = _ASIN_RE.search(line)
        if match is not None and match.group(1) not in wanted:
            n_unreviewed += 1  # no review mentions this item: skip without parsing the line
            continue
        record = parse_record(line)
        if record is None:
            report.drop("malformed_meta_line", f"{path}:{lineno}")
            continue
        asin = record.get("asin")
        if not isinstance(asin, str) or not asin:
            report.drop("meta_missing_asin", f"{path}:{lineno}")
            continue
        index = wanted.get(asin)
        if index is None:
            n_unreviewed += 1
            continue
        if index in items.attributes:
            report.drop("meta_duplicate_asin", f"{path}:{lineno} ({asin}, first kept)")
            continue
        title = clean_text(record.get("title"), options.unescape_html)
        if options.require_title and not title:
            report.drop("meta_without_title", f"{path}:{lineno} ({asin})")
            continue
        items.attributes[index] = {
            "category": render_category(record.get("category"), options.category, options.unescape_html),
            "title": title,
            "brand": clean_text(record.get("brand"), options.unescape_html),
        }
        if options.keep_image_urls:
            items.image_urls[index] = _image_urls(record)
    report.read["meta_lines"] += n_lines
    report.read["meta_lines_of_unreviewed_items"] += n_unreviewed
    return items


# ----------------------------------------------------------------------------- filters

def _first_occurrence_mask(*keys: np.ndarray) -> np.ndarray:
    """True at the first (in array order) row of every distinct key tuple."""
    n = len(keys[0])
    order = np.lexsort((np.arange(n),) + tuple(reversed(keys)))  # stable: ties keep array order
    sorted_keys = [k[order] for k in keys]
    new_group = np.ones(n, dtype=bool)
    if n > 1:
        same = np.ones(n - 1, dtype=bool)
        for k in sorted_keys:
            same &= k[1:] == k[:-1]
        new_group[1:] = ~same
    mask = np.zeros(n, dtype=bool)
    mask[order[new_group]] = True
    return mask


def _duplicate_mask(users: np.ndarray, items: np.ndarray, times: np.ndarray, policy: str) -> np.ndarray:
    """Rows to keep under the duplicates policy."""
    if policy == "keep" or len(users) == 0:
        return np.ones(len(users), dtype=bool)
    if policy == "exact":
        return _first_occurrence_mask(users, items, times)
    # user-item: keep the earliest interaction of each (user, item); ties -> first in the file.
    by_time = np.argsort(times, kind="stable")
    keep_sorted = _first_occurrence_mask(users[by_time], items[by_time])
    keep = np.zeros(len(users), dtype=bool)
    keep[by_time[keep_sorted]] = True
    return keep


def _k_core(users: np.ndarray, items: np.ndarray, user_k: int, item_k: int) -> np.ndarray:
    """Mask of the interactions in the (user_k, item_k)-core, found by iterated pruning."""
    keep = np.ones(len(users), dtype=bool)
    n_users = int(users.max()) + 1 if len(users) else 0
    n_items = int(items.max()) + 1 if len(items) else 0
    while True:
        u, i = users[keep], items[keep]
        user_count = np.bincount(u, minlength=n_users)
        item_count = np.bincount(i, minlength=n_items)
        ok = (user_count[users] >= user_k) & (item_count[items] >= item_k) & keep
        if np.array_equal(ok, keep):
            return keep
        keep = ok


# ----------------------------------------------------------------------------- assembly

def build_amazon_domain(name: str, reviews: str | os.PathLike, meta: str | os.PathLike,
                        options: AmazonOptions | None = None,
                        report: IngestReport | None = None) -> tuple[Domain, RawItems, IngestReport]:
    """Read the two files and return the processed :class:`Domain` (not yet written).

    Also returns the kept items' metadata (for image URLs) keyed by the *new* item index, and the
    report.  ``domain.extra["ingest"]`` carries the source files, options and report.
    """
    options = options or AmazonOptions()
    options.check()
    report = report or IngestReport()
    log = read_reviews(reviews, report, options.allow_truncated)
    raw_items = read_meta(meta, log.item_ids, options, report)

    users = np.frombuffer(log.users, dtype=np.int32) if len(log) else np.zeros(0, np.int32)
    items = np.frombuffer(log.items, dtype=np.int32) if len(log) else np.zeros(0, np.int32)
    times = np.frombuffer(log.times, dtype=np.int64) if len(log) else np.zeros(0, np.int64)
    report.read["interactions"] = len(users)
    report.read["distinct_users"] = len(log.user_ids)
    report.read["distinct_items"] = len(log.item_ids)

    has_meta = np.zeros(len(log.item_ids), dtype=bool)
    has_meta[np.fromiter(raw_items.attributes.keys(), dtype=np.int64, count=len(raw_items.attributes))] = True
    report.drop("items_without_usable_meta", count=int((~has_meta).sum()))
    keep = has_meta[items]
    report.drop("interactions_of_items_without_meta", count=int((~keep).sum()))
    users, items, times = users[keep], items[keep], times[keep]

    keep = _duplicate_mask(users, items, times, options.duplicates)
    report.drop(f"duplicate_interactions({options.duplicates})", count=int((~keep).sum()))
    users, items, times = users[keep], items[keep], times[keep]

    keep = _k_core(users, items, options.user_k, options.item_k)
    report.drop("interactions_outside_k_core", count=int((~keep).sum()))
    users, items, times = users[keep], items[keep], times[keep]
    if len(users) == 0:
        raise IngestError(f"nothing left after filtering {reviews} with {meta}: {report.to_dict()['dropped']}; "
                          f"check that the files are the same category, or lower --user-k / --item-k")

    order = np.lexsort((times, users))  # by user, then time; stable, so ties keep file order
    users, items = users[order], items[order]
    kept_users, user_new = np.unique(users, return_inverse=True)  # ascending raw index = file order
    first_seen_items, first_pos = np.unique(items, return_index=True)
    item_rank = np.argsort(first_pos, kind="stable")  # items by first appearance in the ordered log
    raw_to_new = np.full(len(log.item_ids), -1, dtype=np.int64)
    raw_to_new[first_seen_items[item_rank]] = np.arange(len(item_rank))
    items_new = raw_to_new[items]

    bounds = np.flatnonzero(np.diff(user_new)) + 1
    train, val, test = {}, {}, {}
    for u, seq in enumerate(np.split(items_new, bounds)):
        seq = seq.tolist()
        train[u], val[u], test[u] = seq[:-2], [seq[-2]], [seq[-1]]

    raw_item_ids = list(log.item_ids)  # dict order == raw index
    raw_user_ids = list(log.user_ids)
    new_item_raw = first_seen_items[item_rank].tolist()
    smap = {raw_item_ids[r]: new for new, r in enumerate(new_item_raw)}
    umap = {raw_user_ids[r]: new for new, r in enumerate(kept_users.tolist())}
    meta_out = {raw_item_ids[r]: raw_items.attributes[r] for r in new_item_raw}
    kept_items = RawItems(attributes={new: raw_items.attributes[r] for new, r in enumerate(new_item_raw)},
                          image_urls={new: raw_items.image_urls[r] for new, r in enumerate(new_item_raw)
                                      if r in raw_items.image_urls})

    domain = Domain(name=name, train=train, val=val, test=test, smap=smap, umap=umap, meta=meta_out,
                    attributes=list(DEFAULT_ATTRIBUTES))
    report.kept.update(users=domain.num_users, items=domain.num_items, interactions=len(items_new))
    domain.extra["ingest"] = {
        "source": "amazon-2018",
        "files": {"reviews": _file_info(reviews), "meta": _file_info(meta)},
        "options": asdict(options),
        "order": "users by first appearance in the reviews file; items by first appearance in the "
                 "time-ordered interactions; ties in time keep file order",
        "split": "leave-one-out: last item test, second to last val, rest train",
    }
    return domain, kept_items, report


def _file_info(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    return {"path": str(path.resolve()), "bytes": path.stat().st_size}
