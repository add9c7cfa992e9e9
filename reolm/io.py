"""Files Reo-LM writes and reads back.

Atomic writes: a reader (or a resumed run after a crash) sees the old file or the new one, never half.

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

__all__ = ["atomic_path", "atomic_dir", "atomic_open", "write_bytes", "write_text", "write_json", "save_npy", "sha256_file",
           "read_json"]


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


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError, expect: type | None = dict,
              missing: str = "") -> Any:
    """The value of a JSON file, of type ``expect`` (None = any); a missing, unreadable or malformed
    file, or one of another type, raises ``error`` with a message that names the file and what is
    wrong (``missing`` adds a hint for the missing case, e.g. which command writes the file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: missing{f' ({missing})' if missing else ''}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except (ValueError, RecursionError) as err:  # an over-long integer, nesting past the decoder's depth
        raise error(f"{path}: malformed JSON ({type(err).__name__})") from None
    if expect is not None and not isinstance(value, expect):
        wanted = "object" if expect is dict else "array" if expect is list else expect.__name__
        raise error(f"{path}: expected a JSON {wanted}, found {type(value).__name__}")
    return value
