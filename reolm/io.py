"""Atomic writes: a reader (or a resumed run after a crash) sees the old file or the new one, never half.

Every file or folder that Reo-LM writes for later use goes through here: the content is written
under a temporary name next to the target (same filesystem, so the rename is atomic) and renamed
over it only once complete. On an exception the temporary is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

__all__ = ["atomic_path", "atomic_dir", "atomic_open", "write_bytes", "write_text", "write_json", "save_npy", "sha256_file"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def temporary_name(path: Path, suffix: str = ".tmp") -> Path:
    """The temporary sibling of ``path`` (hidden, so globs such as ``*.json`` never see it)."""
    return path.with_name(f".{path.name}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed to ``path``.

    ``suffix`` matters to writers that pick a format by extension (``np.save`` appends ``.npy``
    to names without it, so pass ``suffix=".tmp.npy"`` there).
    """
    path = Path(path)
    tmp = temporary_name(path, suffix)
    _remove(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, suffix: str = ".partial") -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces the folder ``path``.

    A folder cannot be renamed over a non-empty one, so an existing ``path`` is moved aside first
    and deleted only after the new one is in place: a crash in between leaves ``path`` complete
    (old or new) or the aside copy, never a half-written ``path``.
    """
    path = Path(path)
    tmp = temporary_name(path, suffix)
    _remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = temporary_name(path, ".old")
    _remove(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on a clean exit it is closed, synced and renamed to ``path``."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (UTF-8, non-ASCII kept) to ``path`` atomically; returns the path."""
    # json.dumps uses the C encoder; json.dump streams through the slow pure-Python one.
    return write_text(path, json.dumps(data, ensure_ascii=False, indent=indent))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save ``array`` as a plain ``.npy`` (no pickled objects) to ``path`` atomically."""
    if np.asarray(array).dtype.hasobject:
        raise TypeError(f"{path}: refusing to save an object array (it could only be read back by unpickling)")
    with atomic_path(path, suffix=".tmp.npy") as tmp:
        np.save(tmp, array, allow_pickle=False)
    return Path(path)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (index folders and model weights are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
