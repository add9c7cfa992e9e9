"""The processed domain folder: one recommendation domain on disk.

The layout is Recformer-compatible so that existing processed data drops in::

    DIR/train.json       {user_idx: [item_idx, ...]}   interactions in time order
    DIR/val.json         {user_idx: [item_idx]}        the held-out validation item
    DIR/test.json        {user_idx: [item_idx]}        the held-out test item
    DIR/smap.json        {item_id: item_idx}           0-based, dense
    DIR/umap.json        {user_id: user_idx}           0-based, dense
    DIR/meta_data.json   {item_id: {attr: value}}      item text attributes
    DIR/domain.json      name, counts, attribute order, format version (ours)
    DIR/images/<item_id>.<jpg|png>                     optional raw images
    DIR/image_features.npy  float16 [num_items, d]     optional, row = item_idx
    DIR/has_image.npy       bool [num_items]           optional

Every file is written under a temporary name and renamed when complete, and
``domain.json`` is written last, so a folder with a ``domain.json`` is whole.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from reolm.io import save_npy, write_json

FORMAT_VERSION = 1
DEFAULT_ATTRIBUTES = ("category", "title", "brand")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

__all__ = [
    "Domain",
    "DomainError",
    "FORMAT_VERSION",
    "DEFAULT_ATTRIBUTES",
    "read_domain",
    "read_domain_info",
    "read_item_ids",
    "read_json",
    "json_excerpt",
    "write_domain",
    "domain_stats",
    "format_stats_table",
    "resolve_domain_dirs",
]


class DomainError(ValueError):
    """A processed domain folder is missing a file or is inconsistent."""


@dataclass
class Domain:
    """One processed domain held in memory (see the module docstring for files)."""

    name: str
    train: dict[int, list[int]]
    val: dict[int, list[int]]
    test: dict[int, list[int]]
    smap: dict[str, int]
    umap: dict[str, int]
    meta: dict[str, dict[str, str]]
    attributes: list[str] = field(default_factory=lambda: list(DEFAULT_ATTRIBUTES))
    image_features: np.ndarray | None = None
    has_image: np.ndarray | None = None
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_users(self) -> int:
        return len(self.umap) if self.umap else len(self.train)

    @property
    def num_items(self) -> int:
        return len(self.smap)

    def item_ids(self) -> list[str]:
        """Item ids ordered by item index."""
        return _ids_by_index(self.smap)

    def item_attributes(self, item_idx: int, ids: list[str] | None = None) -> dict[str, str]:
        """The item's attributes in the domain's attribute order ('' when absent)."""
        item_id = (ids or self.item_ids())[item_idx]
        attrs = self.meta.get(item_id, {})
        return {a: str(attrs.get(a, "") or "") for a in self.attributes}

    def num_interactions(self) -> int:
        """Train + val + test items over all users (the paper's #Inters)."""
        return (sum(len(s) for s in self.train.values()) + sum(len(s) for s in self.val.values())
                + sum(len(s) for s in self.test.values()))

    def image_path(self, item_id: str) -> Path | None:
        """The raw image file of ``item_id`` under ``images/``, if there is one."""
        if self.path is None:
            return None
        for ext in IMAGE_EXTENSIONS:
            candidate = self.path / "images" / f"{item_id}{ext}"
            if candidate.is_file():
                return candidate
        return None

    def image_coverage(self) -> int:
        """Number of items with an image (from has_image.npy, else the images folder)."""
        if self.has_image is not None:
            return int(np.asarray(self.has_image).sum())
        if self.path is not None and (self.path / "images").is_dir():
            stems = {p.stem for p in (self.path / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
            return sum(1 for item_id in self.smap if item_id in stems)
        return 0

    def validate(self) -> None:
        """Raise DomainError naming the first inconsistency found."""
        n_items, n_users = self.num_items, self.num_users
        where = f"domain {self.name!r}" + (f" at {self.path}" if self.path else "")
        if sorted(self.smap.values()) != list(range(n_items)):
            raise DomainError(f"{where}: smap.json item indices must be exactly 0..{n_items - 1}")
        if self.umap and sorted(self.umap.values()) != list(range(n_users)):
            raise DomainError(f"{where}: umap.json user indices must be exactly 0..{n_users - 1}")
        for split_name, split in (("train", self.train), ("val", self.val), ("test", self.test)):
            for user, items in split.items():
                if not 0 <= user < n_users:
                    raise DomainError(f"{where}: {split_name}.json user {user} outside 0..{n_users - 1}")
                if not items:
                    raise DomainError(f"{where}: {split_name}.json user {user} has an empty sequence")
                for item in items:
                    if not 0 <= item < n_items:
                        raise DomainError(f"{where}: {split_name}.json user {user} has item {item} "
                                          f"outside 0..{n_items - 1}")
                if split_name != "train" and user not in self.train:
                    raise DomainError(f"{where}: {split_name}.json user {user} has no training sequence")
        missing = [item_id for item_id in self.smap if item_id not in self.meta]
        if missing:
            raise DomainError(f"{where}: meta_data.json lacks {len(missing)} item(s), e.g. {missing[:3]}")
        for name, arr in (("image_features.npy", self.image_features), ("has_image.npy", self.has_image)):
            if arr is not None and len(arr) != n_items:
                raise DomainError(f"{where}: {name} has {len(arr)} rows for {n_items} items")


# ----------------------------------------------------------------------------- reading

# A JSON escape of a UTF-16 surrogate: only text holding one can decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _line_col(raw: bytes, offset: int) -> tuple[int, int]:
    """1-based line and byte column of ``offset`` in ``raw``."""
    line_start = raw.rfind(b"\n", 0, offset) + 1
    return raw.count(b"\n", 0, offset) + 1, offset - line_start + 1


def _key_path(keys: tuple[Any, ...]) -> str:
    return "key " + "".join(f"[{json.dumps(k)}]" for k in keys) if keys else "top level"


def _lone_surrogate(data: Any) -> str | None:
    """Where in parsed JSON a string (or key) holds a lone surrogate, or None."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        node, keys = stack.pop()
        if isinstance(node, str):
            if not _encodable(node):
                return _key_path(keys)
        elif isinstance(node, dict):
            for k in node:
                if not _encodable(k):
                    return _key_path(keys + (k,)) + " (the key itself)"
            stack.extend(reversed([(v, keys + (k,)) for k, v in node.items()]))
        elif isinstance(node, list):
            stack.extend(reversed([(v, keys + (i,)) for i, v in enumerate(node)]))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_json(path: Path) -> Any:
    """Parse one JSON file of a domain folder or corpus.

    Every failure is a :class:`DomainError` naming the file and where in it: the line and
    column of malformed JSON or of bytes that are not UTF-8, the key of a string holding a
    lone surrogate (``"\ud800"`` parses, but is not text and fails later when written).
    """
    if not path.is_file():
        raise DomainError(f"missing file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line, col = _line_col(raw, err.start)
        raise DomainError(f"{path}: not valid UTF-8 at line {line} column {col} "
                          f"(byte {raw[err.start:err.start + 1]!r}); re-encode the file as UTF-8") from None
    del raw  # large files: do not hold the bytes and the text at once while parsing
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DomainError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if _SURROGATE_ESCAPE.search(text):  # rare: walk the data only when an escape could be one
        where = _lone_surrogate(data)
        if where is not None:
            raise DomainError(f"{path}: {where}: string holds a lone surrogate escape (\\ud800-\\udfff "
                              f"without its pair), which is not valid Unicode text")
    return data


def _is_int(value: Any) -> bool:
    """A JSON integer (``true``/``false`` are bools in Python's eyes, and not indices)."""
    return type(value) is int


def json_excerpt(value: Any) -> str:
    """A value as JSON, cut to a length that fits in an error message."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def read_domain_info(path: str | os.PathLike) -> dict[str, Any]:
    """``domain.json`` of a domain folder, type-checked; ``{}`` when the folder has none."""
    file = Path(path) / "domain.json"
    if not file.is_file():
        return {}
    info = read_json(file)
    if not isinstance(info, dict):
        raise DomainError(f"{file}: expected an object with name, format_version, attributes, counts")
    version = info.get("format_version", FORMAT_VERSION)
    if not _is_int(version) or version < 1:
        raise DomainError(f"{file}: key format_version: expected a positive integer, got {json_excerpt(version)}")
    if version > FORMAT_VERSION:
        raise DomainError(f"{file}: format version {version} is newer than this reolm understands "
                          f"({FORMAT_VERSION}); upgrade reolm")
    name = info.get("name", Path(path).name)
    if not isinstance(name, str) or not name:
        raise DomainError(f"{file}: key name: expected a non-empty string, got {json_excerpt(name)}")
    attributes = info.get("attributes", list(DEFAULT_ATTRIBUTES))
    if (not isinstance(attributes, list) or not attributes
            or not all(isinstance(a, str) and a for a in attributes) or len(set(attributes)) != len(attributes)):
        raise DomainError(f"{file}: key attributes: expected a list of distinct attribute names, "
                          f"got {json_excerpt(attributes)}")
    counts = info.get("counts", {})
    if not isinstance(counts, dict) or not all(_is_int(v) and v >= 0 for v in counts.values()):
        raise DomainError(f"{file}: key counts: expected an object of non-negative integers, "
                          f"got {json_excerpt(counts)}")
    return info


def _index_map(path: Path, data: Any, what: str) -> dict[str, int]:
    """smap.json / umap.json: {id: index} with integer indices (range checked by validate)."""
    if not isinstance(data, Mapping):
        raise DomainError(f"{path}: expected an object {{{what}_id: {what}_idx}}")
    for key, value in data.items():
        if not _is_int(value):
            raise DomainError(f"{path}: {what} {key!r}: index must be an integer, got {json_excerpt(value)}")
    return dict(data)


def _ids_by_index(smap: Mapping[str, int]) -> list[str]:
    ids = [""] * len(smap)
    for item_id, idx in smap.items():
        ids[idx] = item_id
    return ids


def read_item_ids(path: str | os.PathLike) -> list[str]:
    """Item ids in index order from a domain folder's smap.json alone (indices checked dense)."""
    file = Path(path) / "smap.json"
    smap = _index_map(file, read_json(file), "item")
    if sorted(smap.values()) != list(range(len(smap))):
        raise DomainError(f"{file}: item indices must be exactly 0..{len(smap) - 1}")
    return _ids_by_index(smap)


def _meta(path: Path, data: Any) -> dict[str, dict[str, str]]:
    """meta_data.json: {item_id: {attr: text}}; numbers become text, null becomes ''."""
    if not isinstance(data, Mapping):
        raise DomainError(f"{path}: expected an object {{item_id: {{attr: value}}}}")
    out: dict[str, dict[str, str]] = {}
    for item_id, attrs in data.items():
        if attrs is None:
            attrs = {}
        if not isinstance(attrs, Mapping):
            raise DomainError(f"{path}: item {item_id!r}: expected an object {{attr: value}}, "
                              f"got {json_excerpt(attrs)}")
        row: dict[str, str] = {}
        for attr, value in attrs.items():
            if isinstance(value, (dict, list)):
                raise DomainError(f"{path}: item {item_id!r} attribute {attr!r}: expected text or a number, "
                                  f"got {json_excerpt(value)}")
            row[attr] = "" if value is None else str(value)
        out[item_id] = row
    return out


def _int_keyed(path: Path, data: Any) -> dict[int, list[int]]:
    if not isinstance(data, Mapping):
        raise DomainError(f"{path}: expected an object {{user_idx: [item_idx, ...]}}")
    out: dict[int, list[int]] = {}
    for key, items in data.items():
        try:
            user = int(key)
        except (TypeError, ValueError):
            raise DomainError(f"{path}: user key {key!r} is not an integer") from None
        if _is_int(items):
            items = [items]
        if not isinstance(items, list) or not all(_is_int(i) for i in items):
            raise DomainError(f"{path}: user {key}: expected a list of integer item indices, got {json_excerpt(items)}")
        out[user] = items
    return out


def read_domain(path: str | os.PathLike, validate: bool = True, load_features: bool = True) -> Domain:
    """Load a processed domain folder; validate it unless ``validate=False``.

    Types are always checked (a wrong type is a DomainError naming the file and the key);
    ``validate`` adds the consistency checks of :meth:`Domain.validate`.
    """
    path = Path(path)
    if not path.is_dir():
        raise DomainError(f"not a directory: {path}")
    info = read_domain_info(path)
    umap_file = path / "umap.json"
    domain = Domain(
        name=info.get("name", path.name),
        train=_int_keyed(path / "train.json", read_json(path / "train.json")),
        val=_int_keyed(path / "val.json", read_json(path / "val.json")),
        test=_int_keyed(path / "test.json", read_json(path / "test.json")),
        smap=_index_map(path / "smap.json", read_json(path / "smap.json"), "item"),
        umap=_index_map(umap_file, read_json(umap_file), "user") if umap_file.is_file() else {},
        meta=_meta(path / "meta_data.json", read_json(path / "meta_data.json")),
        attributes=list(info.get("attributes", DEFAULT_ATTRIBUTES)),
        path=path,
        extra={k: v for k, v in info.items() if k not in ("name", "attributes", "format_version", "counts")},
    )
    if not domain.umap:  # Recformer folders may ship no umap; synthesise identity ids.
        users = set(domain.train) | set(domain.val) | set(domain.test)
        domain.umap = {str(u): u for u in sorted(users)}
    if (path / "has_image.npy").is_file():
        domain.has_image = _load_npy(path / "has_image.npy")
    if load_features and (path / "image_features.npy").is_file():
        domain.image_features = _load_npy(path / "image_features.npy", mmap_mode="r")
        if domain.has_image is None:
            domain.has_image = np.ones(len(domain.image_features), dtype=bool)
    if validate:
        domain.validate()
    return domain


def _load_npy(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """A .npy array; never unpickles (object arrays are refused with the file named)."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except ValueError as err:
        raise DomainError(f"{path}: not a plain numeric .npy array ({err})") from None


# ----------------------------------------------------------------------------- writing

def write_domain(domain: Domain, path: str | os.PathLike, extra_info: Mapping[str, Any] | None = None) -> Path:
    """Write ``domain`` as a processed folder (validated first); returns the path."""
    domain.validate()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    done = path / "domain.json"
    if done.exists():
        done.unlink()  # the folder is incomplete until domain.json is rewritten below
    for name, split in (("train", domain.train), ("val", domain.val), ("test", domain.test)):
        write_json(path / f"{name}.json", {str(u): items for u, items in sorted(split.items())}, indent=None)
    write_json(path / "smap.json", domain.smap, indent=None)
    write_json(path / "umap.json", domain.umap, indent=None)
    write_json(path / "meta_data.json", domain.meta, indent=None)
    if domain.image_features is not None:
        save_npy(path / "image_features.npy", np.asarray(domain.image_features, dtype=np.float16))
    if domain.has_image is not None:
        save_npy(path / "has_image.npy", np.asarray(domain.has_image, dtype=bool))
    info = {
        "name": domain.name,
        "format_version": FORMAT_VERSION,
        "attributes": list(domain.attributes),
        "counts": {"users": domain.num_users, "items": domain.num_items,
                   "interactions": domain.num_interactions()},
        **domain.extra,
        **(extra_info or {}),
    }
    write_json(done, info, indent=2)
    domain.path = path
    return path


def resolve_domain_dirs(paths: Iterable[str | os.PathLike], warn: Any = None) -> list[Path]:
    """Expand command-line paths into processed domain folders, in order.

    A folder with ``domain.json`` (or Recformer files) is a domain; a folder
    with ``corpus.json`` (written by ``reolm synth``) stands for its domains;
    plain files (``DIR/*`` also matches ``DIR/corpus.json``) are skipped with a
    note through ``warn``. Anything else is a DomainError.
    """
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            if warn is not None:
                warn(f"skipping {path}: a file, not a domain folder")
            continue
        if not path.is_dir():
            raise DomainError(f"no such domain folder: {path}")
        if (path / "domain.json").is_file() or (path / "train.json").is_file():
            out.append(path)
        elif (path / "corpus.json").is_file():
            corpus = read_json(path / "corpus.json")
            domains = corpus.get("domains") if isinstance(corpus, dict) else None
            if not isinstance(domains, list) or not all(isinstance(d, dict) and isinstance(d.get("name"), str)
                                                        for d in domains):
                raise DomainError(f"{path / 'corpus.json'}: key domains: expected a list of objects "
                                  f"with a name")
            out += [path / d["name"] for d in domains]
        else:
            raise DomainError(f"not a processed domain folder (no domain.json or train.json): {path}")
    if not out:
        raise DomainError("no processed domain folders among the given paths")
    return out


# ----------------------------------------------------------------------------- statistics

def domain_stats(domain: Domain) -> dict[str, Any]:
    """The paper's dataset table row: users, items, image coverage, interactions, avg length,
    plus cold items (val/test items that never occur in train.json) and the test users whose
    target is one of them."""
    n_inter = domain.num_interactions()
    n_img = domain.image_coverage()
    n_users = max(domain.num_users, 1)
    trained = {item for seq in domain.train.values() for item in seq}
    held_out = [items[0] for split in (domain.val, domain.test) for items in split.values()]
    cold_test = sum(1 for items in domain.test.values() if items[0] not in trained)
    row = {
        "domain": domain.name,
        "users": domain.num_users,
        "items": domain.num_items,
        "images": n_img,
        "image_coverage": n_img / max(domain.num_items, 1),
        "interactions": n_inter,
        "avg_seq_len": n_inter / n_users,
        "cold_items": len(set(held_out) - trained),
        "cold_test_users": cold_test,
        "cold_test_share": cold_test / max(len(domain.test), 1),
    }
    splits = domain.extra.get("splits")
    if splits:
        row["splits"] = [s.get("kind") for s in splits]
    return row


def format_stats_table(rows: Iterable[Mapping[str, Any]], paper_layout: bool = False) -> str:
    """Markdown table in the layout of the paper's dataset statistics (+ cold items unless ``paper_layout``)."""
    header = "| Dataset | #Users | #Items | #Img (Cover./%) | #Inters | Avg.SL |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"] if paper_layout else \
        [header + " #Cold items (test users/%) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["domain"] + (f" ({'+'.join(r['splits'])})" if r.get("splits") else "")
        line = (f"| {name} | {r['users']:,} | {r['items']:,} | "
                f"{r['images']:,} ({100 * r['image_coverage']:.1f}%) | {r['interactions']:,} | "
                f"{r['avg_seq_len']:.2f} |")
        if not paper_layout:
            line += f" {r['cold_items']:,} ({100 * r['cold_test_share']:.1f}%) |"
        lines.append(line)
    return "\n".join(lines)
