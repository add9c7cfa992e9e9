"""The item catalogue a service holds, and the index folder it is read from and saved to.

An index folder (written by ``reolm embed items``, re-saved by the service)::

    INDEX_DIR/index.json                  manifest, written last (its presence marks a complete folder):
                                          counts, identities, the revision's file names and the size and
                                          sha256 of every file of the revision (``checksums``)
    INDEX_DIR/vectors-<rev>.safetensors   vectors [rows, H] float32, L2-normalised; alive uint8 [rows];
                                          item ids as id_bytes uint8 + id_offsets int64 [rows + 1] (UTF-8);
                                          metadata: the model and tables that produced them (JSON strings)
    INDEX_DIR/index-<rev>.faiss           the FAISS index over the same rows (reolm.serve.index)
    INDEX_DIR/tokens-<rev>/               token table of every row (reolm.data.tables.ItemTokenTable)
    INDEX_DIR/images-<rev>/               image features of every row (ImageFeatureTable)

Every save writes a new revision's files, then the manifest that names them and records their
sizes and sha256, then removes the previous revision's files and any temporaries a killed save
left: a crash at any point leaves one complete revision, and the next save cleans up. Opening a
folder checks every manifest path stays inside the folder (before anything is read), verifies
every file against its size and sha256, then the arrays themselves (ids, alive mask, finite unit
vectors equal to the FAISS rows), so a damaged folder is refused with one line naming the file. The folder carries
the items' content (token rows, image features), so a served history can name any item,
including ones added live, without the original domain folder.
"""

from __future__ import annotations

import json
import os
import re
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
from reolm.io import atomic_path, read_json, sha256_file, write_json
from reolm.serve.config import IndexConfig
from reolm.serve.index import IndexFileError, VectorIndex, normalise

__all__ = ["Catalogue", "MANIFEST", "FORMAT_VERSION", "take_rows", "concat_tables", "read_manifest",
           "verify_files", "write_revision"]

MANIFEST = "index.json"
FORMAT_VERSION = 2  # 2: ``checksums`` (size + sha256 of every file) in the manifest
FILE_KINDS = ("vectors", "faiss", "tokens", "images")
# What a save may delete: a revision's files and the temporaries of reolm.io's atomic writers.
# Anything else in the folder (a user's notes, another tool's files) is never touched.
_OURS = re.compile(r"^\.?(vectors|index|tokens|images)-\d{6}(\.safetensors|\.faiss)?(\.tmp|\.partial|\.old)?$"
                   r"|^\.index\.json\.tmp$")


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
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not an index folder; write one with `reolm embed items`)")
    manifest = read_json(path, IndexFileError)
    for key in ("format_version", "revision", "files", "rows", "dim", "index", "model", "tables"):
        if key not in manifest:
            raise IndexFileError(f"{path}: missing key {key!r}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise IndexFileError(f"{path}: format_version {manifest['format_version']} is newer than this reolm "
                             f"({FORMAT_VERSION})")
    if manifest["format_version"] < 2 or not isinstance(manifest.get("checksums"), dict):
        raise IndexFileError(f"{path}: format_version {manifest['format_version']} records no checksums, so its "
                             f"files cannot be verified; rebuild the folder with `reolm embed items`")
    for key in ("rows", "dim", "revision"):
        if not isinstance(manifest[key], int) or isinstance(manifest[key], bool) or manifest[key] < 0:
            raise IndexFileError(f"{path}: {key} must be a non-negative integer, got {manifest[key]!r}")
    if not all(isinstance(e, dict) for e in manifest["checksums"].values()):
        raise IndexFileError(f"{path}: every checksums entry must be {{\"size\": ..., \"sha256\": ...}}")
    files = manifest["files"]
    if not isinstance(files, dict) or sorted(files) != sorted(FILE_KINDS):
        raise IndexFileError(f"{path}: files must name exactly {', '.join(FILE_KINDS)}")
    for key, name in [*(("files." + k, v) for k, v in files.items()),
                      *(("checksums", k) for k in manifest["checksums"])]:
        _check_inside(Path(folder), name, f"{path}: {key}")
    return manifest


def _check_inside(folder: Path, name: Any, where: str) -> None:
    """Refuse a manifest path that could leave the folder (absolute, '..', a symlink out)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise IndexFileError(f"{where}: {name!r} is not a path inside the index folder")
    root = folder.resolve()
    if not (folder / name).resolve().is_relative_to(root):
        raise IndexFileError(f"{where}: {name!r} leads outside the index folder")


def _checksums(folder: Path, files: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a revision (folders listed file by file)."""
    out = {}
    for name in files.values():
        path = folder / name
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for member in members:
            out[member.relative_to(folder).as_posix()] = {"size": member.stat().st_size,
                                                           "sha256": sha256_file(member)}
    return out


def verify_files(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Check every file the manifest records against its size and sha256 (IndexFileError naming it)."""
    folder = Path(folder)
    for name, entry in manifest["checksums"].items():
        path = folder / name
        if not path.is_file():
            raise IndexFileError(f"{path}: missing (recorded in {folder / MANIFEST})")
        if path.stat().st_size != entry.get("size"):
            raise IndexFileError(f"{path}: {path.stat().st_size} bytes, but {folder / MANIFEST} records "
                                 f"{entry.get('size')}: the file is damaged or from another save")
        if sha256_file(path) != entry.get("sha256"):
            raise IndexFileError(f"{path}: content does not match its sha256 in {folder / MANIFEST}: the file is "
                                 f"damaged")
    for kind, name in manifest["files"].items():  # every file of the revision is covered by a checksum
        if not any(k == name or k.startswith(name + "/") for k in manifest["checksums"]):
            raise IndexFileError(f"{folder / MANIFEST}: no checksum recorded for files.{kind} ({name})")


def remove_stale(folder: Path, keep: Sequence[str]) -> list[str]:
    """Delete earlier revisions' files and leftover temporaries (only names of ours, never ``keep``)."""
    removed = []
    for path in sorted(folder.iterdir()):
        if path.name in keep or not _OURS.match(path.name):
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        removed.append(path.name)
    return removed


# ----------------------------------------------------------------------------- the catalogue

class _Growing:
    """Rows appended in amortised O(1) time: the buffer doubles when full.

    Live adds come one request at a time; concatenating a whole array per add copies
    O(rows) each time and leaves a trail of freed blocks that the allocator rarely returns
    (the service grew to ~2x the memory of the same index loaded from disk). Doubling copies
    each row O(1) times and holds at most 2x the rows.
    """

    def __init__(self, initial: np.ndarray):
        self._buf = np.array(initial, copy=True)
        self.n = len(initial)

    def append(self, rows: np.ndarray) -> None:
        need = self.n + len(rows)
        if need > len(self._buf):
            grown = np.zeros((max(need, 2 * len(self._buf), 16), *self._buf.shape[1:]), self._buf.dtype)
            grown[:self.n] = self._buf[:self.n]
            self._buf = grown
        self._buf[self.n:need] = rows
        self.n = need

    @property
    def array(self) -> np.ndarray:
        return self._buf[:self.n]


class _AddedRows:
    """Content (token rows, image features) of the items added since the folder was read."""

    def __init__(self, image_dim: int):
        self.ids = _Growing(np.zeros(0, np.int32))
        self.types = _Growing(np.zeros(0, np.int8))
        self.word_starts = _Growing(np.zeros(0, np.uint8))
        self.offsets = _Growing(np.zeros(1, np.int64))
        self.features = _Growing(np.zeros((0, image_dim), np.float16))
        self.has_image = _Growing(np.zeros(0, bool))

    def __len__(self) -> int:
        return self.has_image.n

    def append(self, tokens: ItemTokenTable, images: ImageFeatureTable) -> None:
        self.offsets.append(np.asarray(tokens.offsets[1:], np.int64) + int(self.offsets.array[-1]))
        self.ids.append(np.asarray(tokens.ids, np.int32))
        self.types.append(np.asarray(tokens.types, np.int8))
        self.word_starts.append(np.asarray(tokens.word_starts, np.uint8))
        self.features.append(np.asarray(images.features, np.float16))
        self.has_image.append(np.asarray(images.has_image, bool))

    def tokens(self, attributes: tuple[str, ...], key: str) -> ItemTokenTable:
        return ItemTokenTable(self.ids.array, self.types.array, self.word_starts.array, self.offsets.array,
                              attributes, key)


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
        self.ids = ids
        self._alive = _Growing(np.asarray(alive, dtype=bool))
        self.base_tokens, self.base_images = tokens, images
        self.added = _AddedRows(images.dim)
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
    def alive(self) -> np.ndarray:
        return self._alive.array

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    @property
    def num_items(self) -> int:
        return len(self.rows)

    @property
    def image_dim(self) -> int:
        return self.base_images.dim

    @property
    def added_tokens(self) -> ItemTokenTable:
        return self.added.tokens(self.base_tokens.attributes, self.base_tokens.key)

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
        feats[~in_base] = self.added.features.array[rows[~in_base] - base_n]
        has[~in_base] = self.added.has_image.array[rows[~in_base] - base_n]
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
        self.added.append(tokens, images)
        self.ids.extend(ids)
        self._alive.append(np.ones(len(ids), bool))
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
        if not len(self.added):
            return self.base_tokens
        return concat_tables([self.base_tokens, self.added_tokens])

    def all_images(self) -> ImageFeatureTable:
        if not len(self.added):
            return self.base_images
        return ImageFeatureTable(np.concatenate([np.asarray(self.base_images.features), self.added.features.array]),
                                 np.concatenate([np.asarray(self.base_images.has_image), self.added.has_image.array]))

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
        self.added = _AddedRows(self.image_dim)
        return folder

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Catalogue":
        """Read the index folder's current revision: paths, checksums, then the arrays are checked."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
        files = manifest["files"]
        vec_path = folder / files["vectors"]
        try:
            arrays = load_file(str(vec_path))
        except (FileNotFoundError, SafetensorError, OSError) as err:
            raise IndexFileError(f"{vec_path}: cannot read the item vectors ({err})") from None
        rows, dim = int(manifest["rows"]), int(manifest["dim"])
        ids, alive = _checked_arrays(arrays, rows, dim, vec_path)
        try:
            tokens = ItemTokenTable.load(folder / files["tokens"])
            images = ImageFeatureTable.load(folder / files["images"])
        except (TableError, OSError, ValueError) as err:
            raise IndexFileError(f"{folder}: {err}") from None
        _check_tables(tokens, images, len(manifest["tables"]["attributes"]), folder / files["tokens"],
                      folder / files["images"])
        index_cfg = from_dict(IndexConfig, manifest["index"], prefix="index.")
        index = VectorIndex.load(folder / files["faiss"], index_cfg, rows, dim)
        if not index.matches(arrays["vectors"]):
            raise IndexFileError(f"{folder / files['faiss']}: its vectors differ from {vec_path}")
        return cls(ids, alive, tokens, images, index, manifest, folder)

    def check_token_ids(self, vocab_size: int) -> None:
        """Refuse token ids the model has no embedding for (they would fail requests one by one)."""
        ids = np.asarray(self.base_tokens.ids)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            where = self.folder / self.manifest["files"]["tokens"] if self.folder else "token table"
            raise IndexFileError(f"{where}: token ids span {int(ids.min())}..{int(ids.max())}, but the model's "
                                 f"vocabulary has {vocab_size} entries")


def _checked_arrays(arrays: Mapping[str, np.ndarray], rows: int, dim: int, where: Path
                    ) -> tuple[list[str], np.ndarray]:
    """Item ids and alive mask of a vectors file, after checking every array's shape and values."""
    for key in ("vectors", "alive", "id_bytes", "id_offsets"):
        if key not in arrays:
            raise IndexFileError(f"{where}: missing tensor {key!r}")
    vectors, alive = arrays["vectors"], arrays["alive"]
    if vectors.shape != (rows, dim) or vectors.dtype != np.float32:
        raise IndexFileError(f"{where}: vectors are {vectors.dtype} {list(vectors.shape)}, expected float32 "
                             f"[{rows}, {dim}]")
    norms = np.linalg.norm(vectors, axis=1) if rows else np.zeros(0)
    if not np.isfinite(vectors).all() or not np.all((np.abs(norms - 1) < 1e-3) | (norms == 0)):
        raise IndexFileError(f"{where}: vectors must be finite and of unit length")
    if alive.shape != (rows,) or alive.dtype != np.uint8 or not np.isin(alive, (0, 1)).all():
        raise IndexFileError(f"{where}: alive must be {rows} uint8 flags of 0 or 1")
    ids = _decode_ids(arrays["id_bytes"], arrays["id_offsets"], where)
    if len(ids) != rows:
        raise IndexFileError(f"{where}: {len(ids)} item ids but the manifest says {rows} rows")
    if any(not i for i in ids):
        raise IndexFileError(f"{where}: an item id is empty")
    return ids, alive.astype(bool)


def _check_tables(tokens: ItemTokenTable, images: ImageFeatureTable, num_attributes: int, tokens_dir: Path,
                  images_dir: Path) -> None:
    offsets = np.asarray(tokens.offsets)
    if np.any(np.diff(offsets) < 0):
        raise IndexFileError(f"{tokens_dir}: offsets are not increasing")
    types = np.asarray(tokens.types)
    if len(types) and (int(types.min()) < 0 or int(types.max()) > num_attributes):
        raise IndexFileError(f"{tokens_dir}: token types outside 0..{num_attributes}")
    if not np.isfinite(np.asarray(images.features)).all():
        raise IndexFileError(f"{images_dir}: image features are not all finite")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_revision(folder: Path, revision: int, ids: Sequence[str], alive: np.ndarray, vectors: np.ndarray,
                   tokens: ItemTokenTable, images: ImageFeatureTable, index: VectorIndex,
                   manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write revision ``revision`` of an index folder, then its manifest (with every file's size and
    sha256), then remove older revisions and temporaries of killed saves."""
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
    out = {**dict(manifest), "format_version": FORMAT_VERSION, "revision": revision, "files": files,
           "checksums": _checksums(folder, files), "rows": len(ids), "items": int(alive.sum()),
           "dim": int(vectors.shape[1]), "index": to_dict(index.cfg)}
    write_json(folder / MANIFEST, out, indent=2)
    remove_stale(folder, list(files.values()))  # only once the new manifest is in place
    return out


def tensor_rows(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
    """Model output as float32 numpy rows."""
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().float().cpu().numpy()
    return np.ascontiguousarray(vectors, dtype=np.float32)
