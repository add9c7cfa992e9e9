"""The item catalogue a service holds, and the index folder it is read from and saved to.

An index folder (written by ``reolm embed items``, re-saved by the service)::

    INDEX_DIR/index.json                  manifest, written last (its presence marks a complete folder)
    INDEX_DIR/vectors-<rev>.safetensors   vectors [rows, H] float32, L2-normalised; alive uint8 [rows];
                                          item ids as id_bytes uint8 + id_offsets int64 [rows + 1] (UTF-8);
                                          metadata: the model and tables that produced them (JSON strings)
    INDEX_DIR/index-<rev>.faiss           the FAISS index over the same rows (reolm.serve.index)
    INDEX_DIR/tokens-<rev>/               token table of every row (reolm.data.tables.ItemTokenTable)
    INDEX_DIR/images-<rev>/               image features of every row (ImageFeatureTable)

Every save writes a new revision's files, then the manifest that names them, then removes the
previous revision's: a crash at any point leaves one complete revision. The folder carries
the items' content (token rows, image features), so a served history can name any item,
including ones added live, without the original domain folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from reolm.config import from_dict, to_dict
from reolm.data.tables import ImageFeatureTable, ItemTokenTable, TableError
from reolm.io import atomic_path, write_json
from reolm.serve.config import IndexConfig
from reolm.serve.index import IndexFileError, VectorIndex, normalise

__all__ = ["Catalogue", "MANIFEST", "FORMAT_VERSION", "take_rows", "concat_tables", "read_manifest"]

MANIFEST = "index.json"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- table helpers

def take_rows(tokens: ItemTokenTable, rows: np.ndarray) -> ItemTokenTable:
    """The given rows of a (possibly memory-mapped) token table, as a new in-memory table."""
    rows = np.asarray(rows, dtype=np.int64)
    offsets = np.asarray(tokens.offsets)
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gather = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(int(new_offsets[-1]))
    return ItemTokenTable(np.asarray(tokens.ids[gather]), np.asarray(tokens.types[gather]),
                          np.asarray(tokens.word_starts[gather]), new_offsets, tokens.attributes, tokens.key)


def concat_tables(tables: Sequence[ItemTokenTable]) -> ItemTokenTable:
    """Rows of ``tables`` one after the other (same attributes)."""
    shifts = np.cumsum([0] + [int(t.offsets[-1]) for t in tables[:-1]])
    offsets = np.concatenate([[0]] + [np.asarray(t.offsets[1:]) + s for t, s in zip(tables, shifts)])
    return ItemTokenTable(np.concatenate([np.asarray(t.ids) for t in tables]).astype(np.int32),
                          np.concatenate([np.asarray(t.types) for t in tables]).astype(np.int8),
                          np.concatenate([np.asarray(t.word_starts) for t in tables]).astype(np.uint8),
                          offsets.astype(np.int64), tables[0].attributes, tables[0].key)


def _encode_ids(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [i.encode("utf-8") for i in ids]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def _decode_ids(data: np.ndarray, offsets: np.ndarray, where: Path) -> list[str]:
    blob = data.tobytes()
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) < 0):
        raise IndexFileError(f"{where}: id_offsets do not describe id_bytes")
    try:
        return [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    except UnicodeDecodeError as err:
        raise IndexFileError(f"{where}: id_bytes are not UTF-8 ({err})") from None


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (not an index folder; write one with `reolm embed items`)") \
            from None
    except json.JSONDecodeError as err:
        raise IndexFileError(f"{path}: malformed JSON at line {err.lineno}: {err.msg}") from None
    for key in ("format_version", "revision", "files", "rows", "dim", "index", "model", "tables"):
        if key not in manifest:
            raise IndexFileError(f"{path}: missing key {key!r}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise IndexFileError(f"{path}: format_version {manifest['format_version']} is newer than this reolm "
                             f"({FORMAT_VERSION})")
    return manifest


# ----------------------------------------------------------------------------- the catalogue

class Catalogue:
    """Item ids, content and vectors of every row, and which rows are live.

    Not thread-safe by itself: the service mutates and searches it from one worker thread.
    Rows are never renumbered while serving; a deleted or replaced item's row stays in FAISS,
    masked out of every search.
    """

    def __init__(self, ids: list[str], alive: np.ndarray, tokens: ItemTokenTable, images: ImageFeatureTable,
                 index: VectorIndex, manifest: dict[str, Any], folder: Path | None = None):
        n = len(ids)
        if not (len(alive) == len(tokens) == len(images) == index.ntotal == n):
            raise IndexFileError(f"{folder}: {n} ids, {len(alive)} alive flags, {len(tokens)} token rows, "
                                 f"{len(images)} image rows and {index.ntotal} index rows: they must agree")
        self.ids, self.alive = ids, np.asarray(alive, dtype=bool).copy()
        self.base_tokens, self.base_images = tokens, images
        self.added_tokens: ItemTokenTable | None = None
        self.added_features = np.zeros((0, images.dim), np.float16)
        self.added_has_image = np.zeros(0, bool)
        self.index, self.manifest, self.folder = index, manifest, folder
        self.attributes = tuple(manifest["tables"]["attributes"])
        self.rows: dict[str, int] = {}
        for row in np.flatnonzero(self.alive).tolist():
            if ids[row] in self.rows:
                raise IndexFileError(f"{folder}: item id {ids[row]!r} is live in rows {self.rows[ids[row]]} and {row}")
            self.rows[ids[row]] = row
        self.changes = 0  # adds + deletes since the last save
        self._bitmap: np.ndarray | None = None
        self._refresh_bitmap()

    # ------------------------------------------------------------------ reading
    @property
    def num_rows(self) -> int:
        return len(self.ids)

    @property
    def num_items(self) -> int:
        return len(self.rows)

    @property
    def image_dim(self) -> int:
        return self.base_images.dim

    def row_of(self, item_id: str) -> int | None:
        return self.rows.get(item_id)

    def content(self, rows: Sequence[int]) -> tuple[ItemTokenTable, ImageFeatureTable]:
        """Token rows and image features of the given catalogue rows (a small in-memory table)."""
        rows = np.asarray(rows, dtype=np.int64)
        base_n = len(self.base_tokens)
        in_base = rows < base_n
        if in_base.all():
            tokens = take_rows(self.base_tokens, rows)
        else:  # base rows, then added rows, then back into the order asked for
            order = np.argsort(~in_base, kind="stable")
            split = int(in_base.sum())
            parts = [take_rows(self.base_tokens, rows[order][:split])] if split else []
            parts.append(take_rows(self.added_tokens, rows[order][split:] - base_n))
            tokens = take_rows(concat_tables(parts), np.argsort(order, kind="stable"))
        feats = np.zeros((len(rows), self.image_dim), np.float16)
        has = np.zeros(len(rows), bool)
        feats[in_base] = self.base_images.features[rows[in_base]]
        has[in_base] = self.base_images.has_image[rows[in_base]]
        feats[~in_base] = self.added_features[rows[~in_base] - base_n]
        has[~in_base] = self.added_has_image[rows[~in_base] - base_n]
        return tokens, ImageFeatureTable(feats, has)

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[set[int]], ef_search: int = 0,
               nprobe: int = 0) -> list[list[tuple[int, float]]]:
        """Top-``k`` live rows per query as (row, inner product), minus each query's excluded rows.

        Asks FAISS for ``k`` + the number of excluded rows, so excluding never leaves fewer than
        ``k`` results while enough live items remain.
        """
        fetch = k + max((len(e) for e in exclude), default=0)
        bitmap = None if self.alive.all() else self._bitmap
        scores, rows = self.index.search(queries, fetch, bitmap, ef_search, nprobe)
        out = []
        for q_rows, q_scores, skip in zip(rows.tolist(), scores.tolist(), exclude):
            hits = [(r, s) for r, s in zip(q_rows, q_scores) if r >= 0 and r not in skip]
            out.append(hits[:k])
        return out

    # ------------------------------------------------------------------ changes
    def add(self, ids: Sequence[str], tokens: ItemTokenTable, images: ImageFeatureTable,
            vectors: np.ndarray) -> tuple[int, int]:
        """Append items (an id already live is replaced: its old row is masked). Returns (added, replaced)."""
        replaced = 0
        for item_id in ids:
            old = self.rows.get(item_id)
            if old is not None:
                self.alive[old] = False
                replaced += 1
        start = self.num_rows
        self.index.add(normalise(vectors))
        self.added_tokens = tokens if self.added_tokens is None else concat_tables([self.added_tokens, tokens])
        self.added_features = np.concatenate([self.added_features, np.asarray(images.features, np.float16)])
        self.added_has_image = np.concatenate([self.added_has_image, np.asarray(images.has_image, bool)])
        self.ids.extend(ids)
        self.alive = np.concatenate([self.alive, np.ones(len(ids), bool)])
        for offset, item_id in enumerate(ids):
            self.rows[item_id] = start + offset
        self.changes += len(ids)
        self._refresh_bitmap()
        return len(ids) - replaced, replaced

    def delete(self, item_id: str) -> bool:
        row = self.rows.pop(item_id, None)
        if row is None:
            return False
        self.alive[row] = False
        self.changes += 1
        self._refresh_bitmap()
        return True

    def _refresh_bitmap(self) -> None:
        # FAISS reads this buffer during searches; it must stay referenced until the next change.
        self._bitmap = np.packbits(self.alive, bitorder="little")

    # ------------------------------------------------------------------ files
    def all_tokens(self) -> ItemTokenTable:
        if self.added_tokens is None:
            return self.base_tokens
        return concat_tables([self.base_tokens, self.added_tokens])

    def all_images(self) -> ImageFeatureTable:
        if not len(self.added_has_image):
            return self.base_images
        return ImageFeatureTable(np.concatenate([np.asarray(self.base_images.features), self.added_features]),
                                 np.concatenate([np.asarray(self.base_images.has_image), self.added_has_image]))

    def save(self, folder: str | os.PathLike | None = None) -> Path:
        """Write the catalogue as the folder's next revision (see the module docstring)."""
        folder = Path(folder or self.folder)
        revision = int(self.manifest.get("revision", -1)) + 1
        vectors = self.index.vectors()
        manifest = write_revision(folder, revision, self.ids, self.alive, vectors, self.all_tokens(),
                                  self.all_images(), self.index, {**self.manifest, "saved": _now()})
        self.manifest, self.folder, self.changes = manifest, folder, 0
        # Serve content from the files just written (the previous revision's are gone).
        self.base_tokens = ItemTokenTable.load(folder / manifest["files"]["tokens"])
        self.base_images = ImageFeatureTable.load(folder / manifest["files"]["images"])
        self.added_tokens = None
        self.added_features = np.zeros((0, self.image_dim), np.float16)
        self.added_has_image = np.zeros(0, bool)
        return folder

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Catalogue":
        """Read the index folder's current revision (everything checked against the manifest)."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        files = manifest["files"]
        vec_path = folder / files["vectors"]
        try:
            arrays = load_file(str(vec_path))
        except (FileNotFoundError, SafetensorError, OSError) as err:
            raise IndexFileError(f"{vec_path}: cannot read the item vectors ({err})") from None
        for key in ("alive", "id_bytes", "id_offsets"):
            if key not in arrays:
                raise IndexFileError(f"{vec_path}: missing tensor {key!r}")
        ids = _decode_ids(arrays["id_bytes"], arrays["id_offsets"], vec_path)
        try:
            tokens = ItemTokenTable.load(folder / files["tokens"])
            images = ImageFeatureTable.load(folder / files["images"])
        except (TableError, OSError, ValueError) as err:
            raise IndexFileError(f"{folder}: {err}") from None
        index_cfg = from_dict(IndexConfig, manifest["index"], prefix="index.")
        index = VectorIndex.load(folder / files["faiss"], index_cfg, int(manifest["rows"]), int(manifest["dim"]))
        if len(ids) != int(manifest["rows"]):
            raise IndexFileError(f"{vec_path}: {len(ids)} item ids but {folder / MANIFEST} says {manifest['rows']} rows")
        return cls(ids, arrays["alive"].astype(bool), tokens, images, index, manifest, folder)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_revision(folder: Path, revision: int, ids: Sequence[str], alive: np.ndarray, vectors: np.ndarray,
                   tokens: ItemTokenTable, images: ImageFeatureTable, index: VectorIndex,
                   manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write revision ``revision`` of an index folder, then its manifest, then drop older revisions."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{revision:06d}"
    files = {"vectors": f"vectors-{tag}.safetensors", "faiss": f"index-{tag}.faiss",
             "tokens": f"tokens-{tag}", "images": f"images-{tag}"}
    id_bytes, id_offsets = _encode_ids(ids)
    meta = {"model": json.dumps(manifest["model"]), "tables": json.dumps(manifest["tables"])}
    with atomic_path(folder / files["vectors"]) as tmp:
        save_file({"vectors": np.ascontiguousarray(vectors, dtype=np.float32),
                   "alive": np.asarray(alive, dtype=np.uint8), "id_bytes": id_bytes, "id_offsets": id_offsets},
                  str(tmp), metadata=meta)
    index.save(folder / files["faiss"])
    tokens.save(folder / files["tokens"])
    images.save(folder / files["images"])
    alive = np.asarray(alive, dtype=bool)
    previous = (manifest.get("files") or {}) if (folder / MANIFEST).is_file() else {}
    out = {**dict(manifest), "format_version": FORMAT_VERSION, "revision": revision, "files": files,
           "rows": len(ids), "items": int(alive.sum()), "dim": int(vectors.shape[1]),
           "index": to_dict(index.cfg)}
    write_json(folder / MANIFEST, out, indent=2)
    for name in previous.values():  # only after the new manifest is in place
        path = folder / name
        if name not in files.values() and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out


def tensor_rows(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
    """Model output as float32 numpy rows."""
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().float().cpu().numpy()
    return np.ascontiguousarray(vectors, dtype=np.float32)
