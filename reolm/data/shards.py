"""The WebDataset corpus: processed domains -> items / train / dev tar shards + manifest.

Layout and member formats are specified in ``shards/README.md`` (format version
:data:`SHARD_FORMAT_VERSION`).  In short::

    CORPUS/items/items-%06d.tar   one sample per item, key %09d of the global item index
    CORPUS/train/train-%06d.tar   one sample per (user, domain) training sequence
    CORPUS/dev/dev-%06d.tar       the same sequences plus their held-out validation target
    CORPUS/manifest.json          written last: a corpus with a manifest is complete

Writing streams: domains are read one at a time; items go straight into item
shards in global order; sequence records are spilled to on-disk buckets (a
random bucket per sequence, seeded) and each bucket is shuffled in memory and
written out, so sequences of all domains are mixed across shards while memory
stays bounded by one domain plus one bucket.  Shards are written under a
temporary name (:mod:`reolm.io`) with webdataset's ``TarWriter`` (fixed mtime/owner so equal seeds
give equal bytes) and renamed when complete; the manifest records each shard's
sample count, byte size and sha256 so ``verify`` can detect any corruption.
"""

from __future__ import annotations

import hashlib
import io
import contextlib
import json
import math
import os
import shutil
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

from reolm.data.domain import (IMAGE_EXTENSIONS, Domain, DomainError, json_excerpt, read_domain,
                               read_domain_info, read_json)
from reolm.io import atomic_path, write_json

__all__ = [
    "SHARD_FORMAT_VERSION",
    "ShardError",
    "ShardOptions",
    "ShardSeries",
    "VerifyReport",
    "write_corpus",
    "verify_corpus",
    "load_manifest",
    "iter_tar_samples",
    "iter_items",
    "iter_sequences",
    "item_key",
    "sequence_key",
    "image_files",
]

SHARD_FORMAT_VERSION = 1
SPLITS = ("items", "train", "dev")
TAR_MTIME = 0            # fixed tar header fields: identical input + seed -> identical bytes
TAR_OWNER = "reolm"
BUCKET_TARGET = 200_000  # sequence records per shuffle bucket (bounds pass-2 memory)


class ShardError(ValueError):
    """A corpus is missing, incomplete or corrupt, or its input is invalid."""


@dataclass
class ShardOptions:
    """How to cut the corpus into shards."""

    max_count: int = 10_000          # samples per shard
    max_size: int = 1 << 30          # bytes per shard (a shard holds at least one sample)
    seed: int = 0                    # shuffles sequences across train/dev shards
    max_image_side: int | None = None  # downscale larger images (re-encoded), None keeps bytes
    progress: bool = True

    def check(self) -> None:
        if self.max_count < 1:
            raise ShardError(f"--max-count must be >= 1, got {self.max_count}")
        if self.max_size < 1024:
            raise ShardError(f"--max-size must be >= 1024 bytes, got {self.max_size}")
        if self.max_image_side is not None and self.max_image_side < 8:
            raise ShardError(f"--max-image-side must be >= 8 pixels, got {self.max_image_side}")


def item_key(global_index: int) -> str:
    return f"{global_index:09d}"


def sequence_key(domain_index: int, user: int) -> str:
    return f"d{domain_index}_u{user}"


def _compact_json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ----------------------------------------------------------------------------- writing shards

class _HashingFile:
    """A write-only file wrapper that counts bytes and hashes them as they go by."""

    def __init__(self, path: Path):
        self.fh: BinaryIO = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class ShardSeries:
    """Writes ``<dir>/<prefix>-%06d.tar`` shards with webdataset's TarWriter, rotating on count/size.

    Each shard is written under a temporary name (:func:`reolm.io.atomic_path`) and renamed when
    closed; :attr:`entries`
    lists the finished shards for the manifest.
    """

    def __init__(self, root: Path, split: str, max_count: int, max_size: int):
        import webdataset as wds

        self._wds = wds
        self.root, self.split = root, split
        self.max_count, self.max_size = max_count, max_size
        (root / split).mkdir(parents=True, exist_ok=True)
        self.entries: list[dict[str, Any]] = []
        self._writer: Any = None
        self._file: _HashingFile | None = None
        self._rename = contextlib.ExitStack()
        self._count = 0

    def _relpath(self, number: int) -> str:
        return f"{self.split}/{self.split}-{number:06d}.tar"

    def _open(self) -> None:
        self._rename = contextlib.ExitStack()  # closing it renames the finished shard into place
        path = self._rename.enter_context(atomic_path(self.root / self._relpath(len(self.entries))))
        self._file = _HashingFile(path)
        self._writer = self._wds.TarWriter(self._file, user=TAR_OWNER, group=TAR_OWNER, encoder=False,
                                           mtime=TAR_MTIME, compress=False)
        # TarWriter computes a USTAR format but does not hand it to tarfile (which then writes
        # PAX headers, ~30% slower per sample); keys are short, so plain USTAR is exact.
        self._writer.tarstream.format = tarfile.USTAR_FORMAT
        self._count = 0

    def _close_current(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        self._rename.close()
        rel = self._relpath(len(self.entries))
        self.entries.append({"path": rel, "count": self._count, "bytes": self._file.size,
                             "sha256": self._file.sha.hexdigest()})
        self._writer = self._file = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self._writer is not None and (self._count >= self.max_count
                                         or self._final_size_with(members) > self.max_size):
            self._close_current()
        if self._writer is None:
            self._open()
        self._writer.write({"__key__": key, **members})
        self._count += 1

    def _final_size_with(self, members: dict[str, bytes]) -> int:
        """Size the current shard would have on disk if closed after also writing ``members``."""
        # tar: a 512-byte header per member and data padded to 512; closing adds two zero
        # blocks and pads the archive to a whole 10 KiB record.
        size = self._writer.tarstream.offset + 1024
        size += sum(512 + -(-len(v) // 512) * 512 for v in members.values())
        return -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def close(self) -> list[dict[str, Any]]:
        self._close_current()
        return self.entries


# ----------------------------------------------------------------------------- images

@dataclass
class _ImageStats:
    written: int = 0
    unreadable: list[str] = field(default_factory=list)


def image_files(domain_dir: Path) -> dict[str, Path]:
    """item id -> image file, listing the images folder once (not one stat per item).

    Only regular files (or links to them) count: a folder named ``x.jpg`` is no image.
    """
    folder = domain_dir / "images"
    if not folder.is_dir():
        return {}
    with os.scandir(folder) as entries:  # DirEntry.is_file() reuses the listing's file type
        found = sorted(Path(e.path) for e in entries
                       if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file())
    return {p.stem: p for p in found}


def _image_member(path: Path, max_side: int | None) -> tuple[str, bytes]:
    """(member extension, bytes) for one image; raises OSError/ValueError when unreadable."""
    from PIL import Image

    raw = path.read_bytes()
    ext = "png" if path.suffix.lower() == ".png" else "jpg"
    with Image.open(io.BytesIO(raw)) as img:
        img.load()  # decode fully: a truncated file fails here, not later in a training worker
        if max_side is None or max(img.size) <= max_side:
            return ext, raw
        img = img.convert("RGB") if ext == "jpg" else img
        img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, format="PNG" if ext == "png" else "JPEG", quality=90)
        return ext, buf.getvalue()


# ----------------------------------------------------------------------------- the corpus writer

def _domain_user_count(path: Path) -> int:
    counts = read_domain_info(path).get("counts", {})
    if "users" in counts:
        return counts["users"]
    train = read_json(path / "train.json")
    if not isinstance(train, dict):
        raise ShardError(f"{path / 'train.json'}: expected an object {{user_idx: [item_idx, ...]}}")
    return len(train)


def _merged_attributes(domains: Sequence[Path]) -> list[str]:
    """Attribute order of the first domain, then any further attributes of later domains."""
    out: list[str] = []
    for path in domains:
        for attr in read_domain_info(path).get("attributes", ("category", "title", "brand")):
            if attr not in out:
                out.append(attr)
    return out


def _write_domain_items(domain: Domain, d: int, offset: int, series: ShardSeries, opts: ShardOptions,
                        bar: Any) -> _ImageStats:
    images = image_files(domain.path) if domain.path else {}
    stats = _ImageStats()
    ids = domain.item_ids()
    for local, item_id in enumerate(ids):
        record = {"index": offset + local, "id": item_id, "domain": domain.name, "domain_index": d,
                  "attributes": domain.item_attributes(local, ids)}
        members = {"json": _compact_json(record)}
        image_path = images.get(item_id)
        if image_path is not None:
            try:
                ext, data = _image_member(image_path, opts.max_image_side)
                members[ext] = data
                stats.written += 1
            except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three on bad files
                stats.unreadable.append(f"{image_path} ({type(err).__name__}: {err})")
        series.write(item_key(offset + local), members)
        bar.update(1)
    return stats


def _spill_sequences(domain: Domain, d: int, offset: int, buckets: list[BinaryIO],
                     rng: np.random.Generator) -> int:
    """Append one line per user to a seeded random bucket; returns the number of sequences."""
    users = sorted(domain.train)
    choice = rng.integers(0, len(buckets), len(users))
    for user, b in zip(users, choice.tolist()):
        items = [offset + i for i in domain.train[user]]
        val = domain.val.get(user)
        dev = {"domain": d, "user": user, "items": items, "target": offset + val[0]} if val else None
        train = {"domain": d, "user": user, "items": items}
        line = b"\t".join((sequence_key(d, user).encode(), str(len(items)).encode(), _compact_json(train),
                           _compact_json(dev) if dev else b"")) + b"\n"
        buckets[b].write(line)
    return len(users)


def _write_sequence_shards(bucket_paths: list[Path], train: ShardSeries, dev: ShardSeries, seed: int,
                           progress: bool, total: int) -> tuple[int, int, int]:
    """Shuffle each bucket in memory and write train/dev samples; returns (train, dev, skipped)."""
    from tqdm.auto import tqdm

    n_train = n_dev = skipped = 0
    bar = tqdm(total=total, desc="sequence shards", unit="seq", disable=not progress)
    for b, path in enumerate(bucket_paths):
        lines = path.read_bytes().splitlines()
        order = np.random.default_rng([seed, 7919, b]).permutation(len(lines))
        for k in order.tolist():
            key, length, train_json, dev_json = lines[k].split(b"\t")
            key_s = key.decode()
            # Pre-training needs a history and a target: a 1-item train split cannot form one.
            if int(length) >= 2:
                train.write(key_s, {"json": train_json})
                n_train += 1
            else:
                skipped += 1
            if dev_json:
                dev.write(key_s, {"json": dev_json})
                n_dev += 1
        bar.update(len(lines))
        path.unlink()
    bar.close()
    return n_train, n_dev, skipped


def write_corpus(domain_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
                 opts: ShardOptions | None = None, name: str | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write processed domain folders (in this order) as a WebDataset corpus; returns the manifest."""
    from tqdm.auto import tqdm

    opts = opts or ShardOptions()
    opts.check()
    out = Path(out)
    paths = [Path(p) for p in domain_dirs]
    if not paths:
        raise ShardError("no domain folders given")
    names_seen: set[str] = set()
    for p in paths:
        if not p.is_dir():
            raise ShardError(f"not a processed domain folder: {p}")
    _prepare_output(out, overwrite)

    total_users = sum(_domain_user_count(p) for p in paths)
    num_buckets = max(1, math.ceil(total_users / BUCKET_TARGET))
    bucket_dir = out / ".buckets.tmp"
    bucket_dir.mkdir()
    bucket_paths = [bucket_dir / f"bucket-{b:05d}.tsv" for b in range(num_buckets)]
    buckets = [open(p, "wb") for p in bucket_paths]

    items = ShardSeries(out, "items", opts.max_count, opts.max_size)
    domains_info: list[dict[str, Any]] = []
    offset = 0
    skipped_images: list[str] = []
    bar = tqdm(desc="item shards", unit="item", disable=not opts.progress)
    try:
        for d, path in enumerate(paths):
            domain = read_domain(path, validate=True, load_features=False)
            if domain.name in names_seen:
                raise ShardError(f"{path}: domain name {domain.name!r} given twice")
            names_seen.add(domain.name)
            bar.total = (bar.total or 0) + domain.num_items
            img = _write_domain_items(domain, d, offset, items, opts, bar)
            n_seq = _spill_sequences(domain, d, offset, buckets, np.random.default_rng([opts.seed, d]))
            skipped_images += img.unreadable
            domains_info.append({"name": domain.name, "index": d, "item_offset": offset,
                                 "num_items": domain.num_items, "num_users": domain.num_users,
                                 "num_interactions": domain.num_interactions(), "num_images": img.written,
                                 "num_sequences": n_seq, "role": domain.extra.get("role", "pretrain"),
                                 "source": str(path)})
            offset += domain.num_items
            del domain  # bounded memory: one domain at a time
    except BaseException:
        shutil.rmtree(bucket_dir, ignore_errors=True)  # a bad domain leaves no spill files behind
        raise
    finally:
        for fh in buckets:
            fh.close()
        bar.close()
    item_entries = items.close()

    train = ShardSeries(out, "train", opts.max_count, opts.max_size)
    dev = ShardSeries(out, "dev", opts.max_count, opts.max_size)
    n_train, n_dev, n_short = _write_sequence_shards(bucket_paths, train, dev, opts.seed, opts.progress,
                                                     total_users)
    shutil.rmtree(bucket_dir)

    if skipped_images:
        shown = "\n  ".join(skipped_images[:5])
        warnings.warn(f"{len(skipped_images)} unreadable image(s) were left out (items kept without an "
                      f"image), e.g.:\n  {shown}", stacklevel=2)
    manifest = {
        "format_version": SHARD_FORMAT_VERSION,
        "name": name or out.name,
        "seed": opts.seed,
        "attributes": _merged_attributes(paths),
        "domains": domains_info,
        "num_items": offset,
        "shards": {"items": item_entries, "train": train.close(), "dev": dev.close()},
        "totals": {"items": offset, "train": n_train, "dev": n_dev,
                   "interactions": sum(x["num_interactions"] for x in domains_info),
                   "images": sum(x["num_images"] for x in domains_info)},
        "skipped": {"short_train_sequences": n_short, "unreadable_images": len(skipped_images)},
        "options": {"max_count": opts.max_count, "max_size": opts.max_size,
                    "max_image_side": opts.max_image_side},
    }
    write_json(out / "manifest.json", manifest, indent=1)
    return manifest


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an existing corpus unless asked; clear stale parts before writing."""
    if (out / "manifest.json").exists() and not overwrite:
        raise ShardError(f"{out} already holds a corpus (manifest.json); pass --overwrite to replace it")
    if out.exists():
        (out / "manifest.json").unlink(missing_ok=True)  # the corpus is incomplete from here on
        for sub in (*SPLITS, "tables", ".buckets.tmp"):
            if (out / sub).exists():
                shutil.rmtree(out / sub)  # derived tables of the old corpus would be stale
    out.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- reading

def load_manifest(corpus: str | os.PathLike) -> dict[str, Any]:
    """The corpus manifest, checked against the format of ``shards/README.md``.

    A clear ShardError naming the manifest and the key when the corpus is missing, incomplete
    or its manifest does not fit the format (a wrong type, a missing key, a shard path that
    leaves the corpus).
    """
    path = Path(corpus) / "manifest.json"
    if not path.is_file():
        raise ShardError(f"{corpus}: no manifest.json (not a corpus, or `reolm shard` did not finish)")
    try:
        manifest = read_json(path)
    except DomainError as err:
        raise ShardError(str(err)) from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: expected an object (the corpus manifest)")
    version = manifest.get("format_version")
    if version != SHARD_FORMAT_VERSION:
        raise ShardError(f"{path}: shard format version {version!r}, this reolm reads {SHARD_FORMAT_VERSION}")
    _check_manifest(manifest, path)
    return manifest


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0  # bool is not a count


_MISSING = object()


def _need(ok: bool, path: Path, key: str, expected: str, value: Any) -> None:
    if not ok:
        shown = "nothing (the key is missing)" if value is _MISSING else json_excerpt(value)
        raise ShardError(f"{path}: key {key}: expected {expected}, got {shown}")


def _inside_split(rel: Any, split: str) -> bool:
    """A relative POSIX path under the split's folder, never leaving the corpus."""
    if not isinstance(rel, str) or "\\" in rel:
        return False
    parts = PurePosixPath(rel).parts
    return not rel.startswith("/") and len(parts) >= 2 and parts[0] == split and ".." not in parts


def _check_shard_entries(entries: Any, split: str, path: Path) -> None:
    _need(isinstance(entries, list), path, f"shards.{split}", "a list of shard entries", entries)
    for n, entry in enumerate(entries):
        key = f"shards.{split}[{n}]"
        _need(isinstance(entry, dict), path, key, "an object {path, count, bytes, sha256}", entry)
        _need(_inside_split(entry.get("path", _MISSING), split), path, f"{key}.path",
              f"a relative path under {split}/ inside the corpus", entry.get("path", _MISSING))
        _need(_is_count(entry.get("count", _MISSING)), path, f"{key}.count", "a sample count",
              entry.get("count", _MISSING))
        if "bytes" in entry:
            _need(_is_count(entry["bytes"]), path, f"{key}.bytes", "a byte count", entry["bytes"])
        if "sha256" in entry:
            _need(isinstance(entry["sha256"], str), path, f"{key}.sha256", "a hex string", entry["sha256"])


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Every key a reader uses, with its type; shard paths stay inside the corpus."""
    get = manifest.get
    _need(isinstance(get("attributes", _MISSING), list) and all(isinstance(a, str) for a in get("attributes")),
          path, "attributes", "a list of attribute names", get("attributes", _MISSING))
    _need(_is_count(get("num_items", _MISSING)), path, "num_items", "a count", get("num_items", _MISSING))
    domains = get("domains", _MISSING)
    _need(isinstance(domains, list), path, "domains", "a list", domains)
    for d, dom in enumerate(domains):
        _need(isinstance(dom, dict), path, f"domains[{d}]", "an object", dom)
        _need(isinstance(dom.get("name"), str), path, f"domains[{d}].name", "a string", dom.get("name", _MISSING))
        for key in ("item_offset", "num_items"):
            _need(_is_count(dom.get(key, _MISSING)), path, f"domains[{d}].{key}", "a count", dom.get(key, _MISSING))
    shards = get("shards", _MISSING)
    _need(isinstance(shards, dict), path, "shards", "an object {items, train, dev}", shards)
    for split in SPLITS:
        _check_shard_entries(shards.get(split, _MISSING), split, path)
    totals = get("totals", _MISSING)
    _need(isinstance(totals, dict), path, "totals", "an object of counts", totals)
    for split in SPLITS:
        _need(_is_count(totals.get(split, _MISSING)), path, f"totals.{split}", "a count",
              totals.get(split, _MISSING))


def iter_tar_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of one tar shard, in file order.

    Members of a sample are consecutive (as TarWriter writes them); the key is the
    member name up to its first dot, as in webdataset.
    """
    key: str | None = None
    sample: dict[str, bytes] = {}
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if k != key and key is not None:
                yield key, sample
                sample = {}
            key = k
            sample[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, sample


def _shard_records(corpus: Path, entries: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, bytes]]]:
    """(json record, sample) of every sample of ``entries`` in order; a corrupt shard is a
    ShardError naming the shard and the key (``reolm verify`` lists every problem)."""
    for entry in entries:
        key = "<start of shard>"
        try:
            for key, sample in iter_tar_samples(corpus / entry["path"]):
                yield json.loads(sample["json"]), sample
        except (KeyError, ValueError, tarfile.TarError, EOFError) as err:  # JSON/UTF-8 errors are ValueErrors
            raise ShardError(f"{corpus / entry['path']}: key {key}: unreadable sample ({type(err).__name__}: "
                             f"{err}); run `reolm verify {corpus}`") from None


def iter_items(corpus: str | os.PathLike, with_images: bool = False) -> Iterator[dict[str, Any]]:
    """Item records in global index order; with ``with_images`` each has "image": (ext, bytes) | None."""
    corpus = Path(corpus)
    for record, sample in _shard_records(corpus, load_manifest(corpus)["shards"]["items"]):
        if with_images:
            ext = "jpg" if "jpg" in sample else "png" if "png" in sample else None
            record["image"] = (ext, sample[ext]) if ext else None
        yield record


def iter_sequences(corpus: str | os.PathLike, split: str = "train") -> Iterator[dict[str, Any]]:
    """Sequence records of the train or dev split, in shard order."""
    corpus = Path(corpus)
    for record, _ in _shard_records(corpus, load_manifest(corpus)["shards"][split]):
        yield record


# ----------------------------------------------------------------------------- verification

@dataclass
class VerifyReport:
    """What ``verify_corpus`` found: per-split sample counts and every problem, by shard and key."""

    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_item(record: dict[str, Any], key: str, expected_index: int, domains: list[dict[str, Any]]) -> str | None:
    if key != item_key(expected_index) or record.get("index") != expected_index:
        return f"expected item {expected_index}, found index {record.get('index')}"
    d = record.get("domain_index")
    if not isinstance(d, int) or not 0 <= d < len(domains):
        return f"domain_index {d!r} is not a domain of the manifest"
    dom = domains[d]
    if not dom["item_offset"] <= expected_index < dom["item_offset"] + dom["num_items"]:
        return f"item {expected_index} lies outside domain {dom['name']}'s index range"
    if not isinstance(record.get("attributes"), dict):
        return "missing 'attributes' object"
    return None


def _check_sequence(record: dict[str, Any], key: str, split: str, manifest: dict[str, Any]) -> str | None:
    d, user, items = record.get("domain"), record.get("user"), record.get("items")
    if not (isinstance(d, int) and 0 <= d < len(manifest["domains"]) and isinstance(user, int)):
        return f"domain {d!r} / user {user!r} is not a (domain index, user index) of this corpus"
    if key != sequence_key(d, user):
        return f"key does not match domain {d} / user {user}"
    dom = manifest["domains"][d]
    lo, hi = dom["item_offset"], dom["item_offset"] + dom["num_items"]
    if not isinstance(items, list) or not items or not all(isinstance(i, int) and lo <= i < hi for i in items):
        return f"items must be a non-empty list of item indices of domain {dom['name']} ({lo}..{hi - 1})"
    if split == "dev":
        target = record.get("target")
        if not isinstance(target, int) or not lo <= target < hi:
            return f"dev target {target!r} is not an item of domain {dom['name']}"
    return None


def _decode_image(ext: str, data: bytes) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()


def _verify_shard(corpus: Path, split: str, entry: dict[str, Any], manifest: dict[str, Any],
                  next_item: int, report: VerifyReport, bar: Any) -> None:
    """Check one shard; ``next_item`` is the global index its first item must have (items split)."""
    path = corpus / entry["path"]
    where = entry["path"]
    if not path.is_file():
        report.problems.append(f"{where}: missing shard file")
        return
    if "bytes" in entry and path.stat().st_size != entry["bytes"]:
        report.problems.append(f"{where}: size {path.stat().st_size} bytes, manifest says {entry['bytes']}")
    elif "sha256" in entry:
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                sha.update(block)
        if sha.hexdigest() != entry["sha256"]:
            report.problems.append(f"{where}: sha256 differs from the manifest (file changed or corrupted)")
    count = 0
    key = "<start of shard>"
    try:
        for key, sample in iter_tar_samples(path):
            count += 1
            bar.update(1)
            if "json" not in sample:
                report.problems.append(f"{where}: key {key}: no json member")
                continue
            try:
                record = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                report.problems.append(f"{where}: key {key}: corrupt json ({err})")
                continue
            if split == "items":
                problem = _check_item(record, key, next_item, manifest["domains"])
                next_item += 1
                for ext in ("jpg", "png"):
                    if ext in sample:
                        try:
                            _decode_image(ext, sample[ext])
                        except Exception as err:  # noqa: BLE001 - any decoder failure is corruption
                            report.problems.append(f"{where}: key {key}: corrupt {ext} image ({err})")
            else:
                problem = _check_sequence(record, key, split, manifest)
            if problem:
                report.problems.append(f"{where}: key {key}: {problem}")
    except (tarfile.TarError, EOFError, OSError) as err:
        report.problems.append(f"{where}: unreadable tar after key {key} ({type(err).__name__}: {err})")
    if count != entry["count"]:
        report.problems.append(f"{where}: {count} samples, manifest says {entry['count']}")
    report.counts[split] = report.counts.get(split, 0) + count


def verify_corpus(corpus: str | os.PathLike, progress: bool = True) -> VerifyReport:
    """Re-read every shard: counts vs the manifest, every json and image decoded, checksums."""
    from tqdm.auto import tqdm

    corpus = Path(corpus)
    manifest = load_manifest(corpus)
    report = VerifyReport()
    totals = manifest["totals"]
    for split in SPLITS:
        entries = manifest["shards"].get(split, [])
        bar = tqdm(total=sum(e["count"] for e in entries), desc=f"verify {split}", unit="sample",
                   disable=not progress)
        first_item = 0
        for entry in entries:
            # each items shard starts where the manifest says, so one bad shard does not cascade
            _verify_shard(corpus, split, entry, manifest, first_item, report, bar)
            first_item += entry["count"]
        bar.close()
        listed = {e["path"] for e in entries}
        for extra in sorted((corpus / split).glob("*.tar*")) if (corpus / split).is_dir() else []:
            rel = f"{split}/{extra.name}"
            if rel not in listed:
                report.problems.append(f"{rel}: file not listed in the manifest (stale or half-written)")
        expected = totals["items" if split == "items" else split]
        if sum(e["count"] for e in entries) != expected:
            report.problems.append(f"manifest: {split} shards hold {sum(e['count'] for e in entries)} "
                                   f"samples, totals say {expected}")
    if manifest["num_items"] != sum(d["num_items"] for d in manifest["domains"]):
        report.problems.append("manifest: num_items differs from the sum over domains")
    return report
