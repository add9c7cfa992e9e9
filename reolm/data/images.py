"""Item images into a processed domain folder: raw files, img2dataset shards, or features.

Three ways in:

* a local directory of ``<item_id>.<ext>`` files (``from_directory``);
* img2dataset-style WebDataset shards, where each sample is ``<key>.jpg`` + ``<key>.json`` with
  the downloaded ``url``; samples are joined to items through the metadata's image URLs
  (``from_shards``);
* precomputed features ``[rows, d]`` aligned by item index or by an id list
  (``import_features``) -> ``image_features.npy`` (float16) + ``has_image.npy``.

Raw image bytes are decoded and verified with PIL; corrupt and tiny images are counted and
dropped; images larger than ``max_side`` are shrunk (aspect kept) and re-encoded.  Each image is
written as ``DIR/images/<item_id>.jpg|png`` through a temporary name, and ``has_image.npy``
records which items got one.
"""

from __future__ import annotations

import glob as globlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from reolm.data.domain import read_domain
from reolm.data.ingest_report import IngestReport
from reolm.io import atomic_path, save_npy, write_json

__all__ = ["ImageOptions", "ImageSink", "normalize_image", "from_directory", "from_shards", "iter_shard_samples",
           "count_failed_downloads", "import_features", "FLOAT16_MAX"]

FLOAT16_MAX = 65504.0
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


@dataclass
class ImageOptions:
    max_side: int = 512      # longer side after resizing (pixels)
    min_side: int = 32       # images whose shorter side is below this are dropped as tiny
    jpeg_quality: int = 90


def normalize_image(data: bytes, options: ImageOptions) -> tuple[bytes, str] | str:
    """Verified, size-capped image bytes and their extension, or the reason to drop them."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()  # structural check (truncated / corrupt files)
        image = Image.open(io.BytesIO(data))
        image.load()  # full decode: verify() does not catch everything
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return "corrupt_image"
    if min(image.size) < options.min_side:
        return "tiny_image"
    shrink = max(image.size) > options.max_side
    if not shrink and image.format == "JPEG" and image.mode in ("RGB", "L"):
        return data, "jpg"  # already fine: keep the original bytes (no generation loss)
    if not shrink and image.format == "PNG":
        return data, "png"
    if shrink:
        image.thumbnail((options.max_side, options.max_side), Image.Resampling.BICUBIC)
    has_alpha = image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info)
    out = io.BytesIO()
    if has_alpha:
        image.save(out, "PNG")
        return out.getvalue(), "png"
    image.convert("RGB").save(out, "JPEG", quality=options.jpeg_quality)
    return out.getvalue(), "jpg"


class ImageSink:
    """Writes verified images of one domain's items and tracks ``has_image``."""

    def __init__(self, domain_dir: str | os.PathLike, item_ids: Sequence[str], options: ImageOptions,
                 report: IngestReport):
        self.dir = Path(domain_dir) / "images"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.item_ids = item_ids
        self.options = options
        self.report = report
        self.has_image = np.zeros(len(item_ids), dtype=bool)

    def add(self, item_index: int, data: bytes, where: str) -> bool:
        """Verify and store one image of ``item_index``; returns whether it was kept."""
        if self.has_image[item_index]:
            self.report.drop("second_image_of_item", where)
            return False
        result = normalize_image(data, self.options)
        if isinstance(result, str):
            self.report.drop(result, where)
            return False
        payload, ext = result
        item_id = self.item_ids[item_index]
        if "/" in item_id or "\\" in item_id or item_id.startswith("."):
            self.report.drop("item_id_unsafe_as_file_name", where)
            return False
        final = self.dir / f"{item_id}.{ext}"
        with atomic_path(final) as tmp:  # not synced one by one: a folder of many small files
            tmp.write_bytes(payload)
        stale = self.dir / f"{item_id}.{'png' if ext == 'jpg' else 'jpg'}"
        if stale.exists():  # an earlier run stored this item's image in the other format
            stale.unlink()
        self.has_image[item_index] = True
        return True

    def finish(self) -> np.ndarray:
        self.report.kept["images"] = int(self.has_image.sum())
        return self.has_image


def from_directory(source: str | os.PathLike, sink: ImageSink, smap: Mapping[str, int]) -> None:
    """Images named ``<item_id>.<ext>`` in ``source`` (files of unknown items are counted)."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"image directory not found: {source}")
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    for path in tqdm(files, desc="images", unit="img", leave=False, mininterval=1.0):
        sink.report.read["image_files"] += 1
        if path.suffix.lower().lstrip(".") not in IMAGE_SUFFIXES:
            sink.report.drop("not_an_image_file", str(path))
            continue
        index = smap.get(path.stem)
        if index is None:
            sink.report.drop("image_of_unknown_item", str(path))
            continue
        sink.add(index, path.read_bytes(), str(path))


def _split_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the base name."""
    directory, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_shard_samples(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(where, {ext: bytes})`` per sample of WebDataset tar shards, streaming."""
    for path in paths:
        current_key, sample = None, {}
        try:
            with tarfile.open(path, "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_key(member.name)
                    if key != current_key and sample:
                        yield f"{path}:{current_key}", sample
                        sample = {}
                    current_key = key
                    sample[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"{path}: unreadable tar shard ({err})") from None
        if sample:
            yield f"{path}:{current_key}", sample


def from_shards(pattern: str, sink: ImageSink, url_to_items: Mapping[str, Sequence[int]]) -> None:
    """img2dataset shards: each sample's ``json["url"]`` picks the item(s) its image belongs to."""
    paths = sorted(globlib.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no image shards match {pattern!r}")
    for where, sample in tqdm(iter_shard_samples(paths), desc="image shards", unit="img", leave=False,
                              mininterval=1.0):
        sink.report.read["shard_samples"] += 1
        image_ext = next((e for e in IMAGE_SUFFIXES if e in sample), None)
        if image_ext is None:
            sink.report.drop("shard_sample_without_image", where)
            continue
        try:
            url = json.loads(sample.get("json", b"{}")).get("url")
        except (ValueError, AttributeError):
            url = None
        if not url:
            sink.report.drop("shard_sample_without_url", where)
            continue
        targets = url_to_items.get(url)
        if not targets:
            sink.report.drop("shard_url_of_no_item", where)
            continue
        for index in targets:
            sink.add(index, sample[image_ext], where)
    count_failed_downloads(paths, sink.report)


def count_failed_downloads(shard_paths: Sequence[str | os.PathLike], report: IngestReport) -> None:
    """Add img2dataset's per-shard ``<shard>_stats.json`` to the report: URLs tried, and every failed
    download by img2dataset's reason (HTTP errors, timeouts, bytes that are not an image).

    Those URLs wrote no sample, so their items simply have no image (the coverage counts them).
    Shards without a stats file (not written by img2dataset) add nothing.
    """
    failed: dict[str, int] = {}
    for path in shard_paths:
        stats_path = Path(path).with_name(Path(path).name.split(".")[0] + "_stats.json")
        try:
            stats = json.loads(stats_path.read_text())
            statuses = {str(k): int(v) for k, v in stats.get("status_dict", {}).items()}
            tried = int(stats["count"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        report.read["image_urls_tried"] += tried
        for status, n in statuses.items():
            if status != "success" and n > 0:
                failed[status] = failed.get(status, 0) + n
    for status, n in sorted(failed.items()):
        report.drop("image_download_failed", f"{status} x{n}", count=n)


# ----------------------------------------------------------------------------- features

def _read_ids(path: Path) -> list[str]:
    """Row ids: a JSON list, or one id per line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        ids = json.loads(text)
        if not isinstance(ids, list):
            raise ValueError(f"{path}: expected a JSON list of item ids")
        return [str(i) for i in ids]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_values(features: np.ndarray, path: Path, chunk: int = 65536) -> None:
    """Finite and representable in float16 (checked in chunks: the file may be memory-mapped)."""
    for start in range(0, len(features), chunk):
        block = np.asarray(features[start:start + chunk], dtype=np.float32)
        bad = ~np.isfinite(block) | (np.abs(block) > FLOAT16_MAX)
        if bad.any():
            row = start + int(np.flatnonzero(bad.any(axis=1))[0])
            raise ValueError(f"{path}: row {row} has a value that is not finite or overflows float16")


def import_features(domain_dir: str | os.PathLike, features_path: str | os.PathLike,
                    mask_path: str | os.PathLike | None = None, ids_path: str | os.PathLike | None = None,
                    report: IngestReport | None = None) -> IngestReport:
    """Attach precomputed image features to a processed domain folder.

    Rows align with item indices, or with the item ids listed in ``ids_path``.  Without a mask,
    an all-zero row means "no image" (how MISSRec/UniSRec feature files mark missing images).
    """
    report = report or IngestReport()
    domain_dir, features_path = Path(domain_dir), Path(features_path)
    domain = read_domain(domain_dir, load_features=False)
    if not features_path.is_file():
        raise FileNotFoundError(f"feature file not found: {features_path}")
    features = np.load(features_path, mmap_mode="r")
    if features.ndim != 2:
        raise ValueError(f"{features_path}: features must be 2-D [items, dim], got shape {features.shape}")
    rows, dim = features.shape
    report.read["feature_rows"] = rows
    if mask_path is not None:
        mask = np.load(mask_path)
        if mask.shape != (rows,):
            raise ValueError(f"{mask_path}: mask has shape {mask.shape}, expected ({rows},) to match {features_path}")
        mask = mask.astype(bool)
    else:
        mask = np.concatenate([np.any(np.asarray(features[s:s + 65536]) != 0, axis=1)
                               for s in range(0, rows, 65536)]) if rows else np.zeros(0, dtype=bool)
    _check_values(features, features_path)
    n = domain.num_items
    if ids_path is not None:
        ids = _read_ids(Path(ids_path))
        if len(ids) != rows:
            raise ValueError(f"{ids_path}: {len(ids)} ids for {rows} feature rows in {features_path}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{ids_path}: item ids repeat; each row must be a different item")
        row_of_item = np.full(n, -1, dtype=np.int64)
        for row, item_id in enumerate(ids):
            index = domain.smap.get(item_id)
            if index is None:
                report.drop("feature_row_of_unknown_item", f"{ids_path}:{row + 1} ({item_id})")
                continue
            row_of_item[index] = row
    else:
        if rows != n:
            raise ValueError(f"{features_path}: {rows} feature rows for the {n} items of domain {domain.name!r} "
                             f"({domain_dir}); rows must align with item indices (smap.json), or pass --ids")
        row_of_item = np.arange(n)
    out = np.zeros((n, dim), dtype=np.float16)
    has_image = np.zeros(n, dtype=bool)
    present = np.flatnonzero(row_of_item >= 0)
    out[present] = np.asarray(features[row_of_item[present]], dtype=np.float16)
    has_image[present] = mask[row_of_item[present]]
    out[~has_image] = 0  # masked-out rows are the void image
    save_npy(domain_dir / "image_features.npy", out)
    save_npy(domain_dir / "has_image.npy", has_image)
    report.kept.update(items=n, items_with_features=int(has_image.sum()), dim=dim)
    report.drop("items_without_feature_row", count=int((row_of_item < 0).sum()))
    _record_in_domain_json(domain_dir, "image_features", {
        "source": str(features_path.resolve()), "mask": str(Path(mask_path).resolve()) if mask_path else None,
        "ids": str(Path(ids_path).resolve()) if ids_path else None, "dim": dim,
        "items_with_image": int(has_image.sum()), "report": report.to_dict()})
    return report


def _record_in_domain_json(domain_dir: Path, key: str, value: object) -> None:
    info_path = domain_dir / "domain.json"
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info[key] = value
    write_json(info_path, info, indent=2)
