"""Derived item tables: every item tokenised once, image features computed once.

Tokenising a million items once is far cheaper than tokenising 33M item
occurrences every epoch, so training memory-maps these tables instead.

**Token table** (``ItemTokenTable``): for item ``i`` its text tokens are
``ids[offsets[i]:offsets[i+1]]`` with the matching ``types`` (1..K: the
attribute's position in the attribute order; key and value share it) and
``word_starts`` (1 where a token begins a word, for whole-word masking).  Each
attribute is rendered as its key tokens then its value tokens (an empty value
is the word ``void``), cut to ``max_attr_tokens``.  No special tokens: the
collator adds ``[CLS]`` and the image token.  :func:`tokenize_item` is the
per-item reference; :func:`build_token_table_batched` sends whole batches of
attribute values through the fast tokenizer at once and builds the ragged arrays
chunk by chunk in numpy (identical item for item, tested), so a million-item
corpus is tokenised in minutes and without Python lists of every token.

**Image feature table** (``ImageFeatureTable``): float16 ``features[N, d]`` and
``has_image[N]``; rows of items without an image are zero.

On disk each table is a folder of ``.npy`` files plus ``table.json``; the
folder name carries the identity key of what made it (:func:`tokenizer_key`:
what decides the token ids plus the rendering settings; :func:`vision_model_key`:
the vision checkpoint), so several tokenizers and vision models can share one
corpus.  Where the tables of a corpus or domain folder live and how they are
found is :mod:`reolm.data.corpus`.

**Vision identity** (:class:`VisionIdentity`): which vision checkpoint computed an image
table.  It travels with the model into checkpoints and exports (:func:`vision_record`,
:func:`recorded_vision`), and resuming or fine-tuning refuses image features of another vision
model (:func:`check_same_vision`).  :class:`ItemTables` is what a run reads: both tables and
the identity of the image features, checked against each other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from reolm.io import atomic_dir

log = logging.getLogger(__name__)

TOKEN_TABLE_VERSION = 1
VOID_VALUE = "void"
VISION_FIELD = "vision"  # the key under which checkpoints and exports record the VisionIdentity

__all__ = [
    "ItemTokenTable",
    "ImageFeatureTable",
    "ItemTables",
    "TableError",
    "VisionIdentity",
    "VisionMismatch",
    "UNKNOWN_VISION",
    "VISION_FIELD",
    "vision_record",
    "recorded_vision",
    "check_same_vision",
    "tokenizer_key",
    "tokenizer_identity",
    "key_of_identity",
    "identity_difference",
    "vision_model_key",
    "tokenize_item",
    "build_token_table",
    "tokenize_items_batched",
    "build_token_table_batched",
    "load_tokenizer",
]


class TableError(ValueError):
    """A derived table is missing, stale or inconsistent."""


def _write_table_folder(directory: Path, arrays: Mapping[str, np.ndarray], info: Mapping[str, Any]) -> Path:
    """Write ``NAME.npy`` per array plus ``table.json`` into a temp folder, then swap it into place."""
    with atomic_dir(directory) as tmp:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        (tmp / "table.json").write_text(json.dumps(dict(info), indent=2))
    return directory


# The parts of a serialised fast tokenizer that decide the token ids of a text.  Left out on
# purpose: "truncation" and "padding" (call-time state that transformers switches off on the
# first call, so a tokenizer.json that configures them would change key after one use; our
# tables never truncate or pad), "decoder" (ids -> text only) and "version".
_ID_DETERMINING_PARTS = ("model", "normalizer", "pre_tokenizer", "post_processor", "added_tokens")
# Bumped when the identity recipe changes, so tables keyed the old way are rebuilt, not misread.
IDENTITY_VERSION = 2


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def tokenizer_identity(tokenizer: Any, attributes: Sequence[str], max_attr_tokens: int) -> dict[str, str]:
    """Digest per part that determines a token table's content, for ``tokenizer_key`` and for
    saying which part changed when a table is not found.

    Fast tokenizers: vocabulary/merges (``model``), normaliser, pre-tokeniser, post-processor
    and added tokens from the backend serialisation, plus transformers' special-token map;
    slow ones: their class and vocabulary.  ``rendering`` covers the attribute order, the
    per-attribute cap and the table format.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts: dict[str, str] = {}
    if backend is not None:
        serialised = json.loads(backend.to_str())
        parts.update({name: _digest(serialised.get(name)) for name in _ID_DETERMINING_PARTS})
    else:
        parts["model"] = _digest([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    parts["special_tokens"] = _digest(dict(getattr(tokenizer, "special_tokens_map", {}) or {}))
    parts["rendering"] = _digest([list(attributes), int(max_attr_tokens), TOKEN_TABLE_VERSION, IDENTITY_VERSION])
    return parts


def tokenizer_key(tokenizer: Any, attributes: Sequence[str], max_attr_tokens: int) -> str:
    """Stable identity of (what decides the token ids + rendering settings), 12 hex chars."""
    return key_of_identity(tokenizer_identity(tokenizer, attributes, max_attr_tokens))


def key_of_identity(identity: Mapping[str, str]) -> str:
    return _digest(dict(identity))


def identity_difference(expected: Mapping[str, str], found: Mapping[str, str]) -> list[str]:
    """Names of the identity parts that differ (a table from before identities were recorded: all)."""
    return sorted(name for name in set(expected) | set(found) if expected.get(name) != found.get(name))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def vision_model_key(vision_dir: str | os.PathLike) -> str:
    """12-hex identity of a vision checkpoint: its config, processor config and weight files."""
    vision_dir = Path(vision_dir)
    h = hashlib.sha1()
    for p in sorted(vision_dir.iterdir()):
        if p.suffix == ".json":
            h.update(p.name.encode() + p.read_bytes())
        elif p.suffix in WEIGHT_SUFFIXES:
            # size + first and last MiB: cheap for multi-GB weights, still changes with any retraining
            with open(p, "rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(0, p.stat().st_size - (1 << 20)))
                tail = fh.read()
            h.update(p.name.encode() + str(p.stat().st_size).encode() + head + tail)
    return h.hexdigest()[:12]


def _encode_words(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and a 0/1 flag per token marking word starts."""
    enc = tokenizer(text, add_special_tokens=False)
    ids = list(enc["input_ids"])
    try:
        word_ids = enc.word_ids()
    except (AttributeError, ValueError):  # slow tokenizers have no word ids
        word_ids = list(range(len(ids)))
    starts = [1 if i == 0 or w is None or w != word_ids[i - 1] else 0 for i, w in enumerate(word_ids)]
    return ids, starts


def tokenize_item(tokenizer: Any, attrs: Mapping[str, str], attributes: Sequence[str],
                  max_attr_tokens: int = 32) -> tuple[list[int], list[int], list[int]]:
    """Render one item: per attribute, key then value tokens, cut to ``max_attr_tokens``.

    Returns (ids, types, word_starts); types are 1..K in attribute order.
    """
    ids: list[int] = []
    types: list[int] = []
    starts: list[int] = []
    for k, name in enumerate(attributes, start=1):
        value = str(attrs.get(name, "") or "").strip() or VOID_VALUE
        key_ids, key_starts = _encode_words(tokenizer, name)
        val_ids, val_starts = _encode_words(tokenizer, " " + value)
        a_ids = (key_ids + val_ids)[:max_attr_tokens]
        a_starts = (key_starts + val_starts)[:max_attr_tokens]
        if a_starts:
            a_starts[0] = 1
        ids += a_ids
        starts += a_starts
        types += [k] * len(a_ids)
    return ids, types, starts


@dataclass
class ItemTokenTable:
    """Ragged per-item token ids, token types and word starts (possibly memory-mapped)."""

    ids: np.ndarray          # int32 [T]
    types: np.ndarray        # int8  [T]
    word_starts: np.ndarray  # uint8 [T]
    offsets: np.ndarray      # int64 [N + 1]
    attributes: tuple[str, ...] = ()
    key: str = ""
    identity: Mapping[str, str] | None = None  # tokenizer_identity parts behind ``key``

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0:
            raise TableError("offsets must be a 1-D array starting at 0")
        total = int(self.offsets[-1])
        if not (len(self.ids) == len(self.types) == len(self.word_starts) == total):
            raise TableError(f"token arrays hold {len(self.ids)}/{len(self.types)}/{len(self.word_starts)} "
                             f"entries but offsets end at {total}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_attributes(self) -> int:
        return len(self.attributes)

    def item(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, types, word_starts) of one item."""
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.ids[lo:hi], self.types[lo:hi], self.word_starts[lo:hi]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_lists(cls, rows: Iterable[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                   attributes: Sequence[str] = (), key: str = "",
                   identity: Mapping[str, str] | None = None) -> "ItemTokenTable":
        """Build in memory from per-item (ids, types, word_starts) rows."""
        ids: list[int] = []
        types: list[int] = []
        starts: list[int] = []
        offsets = [0]
        for r_ids, r_types, r_starts in rows:
            ids += list(r_ids)
            types += list(r_types)
            starts += list(r_starts)
            offsets.append(len(ids))
        return cls(np.asarray(ids, dtype=np.int32), np.asarray(types, dtype=np.int8),
                   np.asarray(starts, dtype=np.uint8), np.asarray(offsets, dtype=np.int64),
                   tuple(attributes), key, identity)

    def save(self, directory: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the table folder atomically (temp folder, then rename)."""
        arrays = {"ids": np.asarray(self.ids, dtype=np.int32), "types": np.asarray(self.types, dtype=np.int8),
                  "word_starts": np.asarray(self.word_starts, dtype=np.uint8),
                  "offsets": np.asarray(self.offsets, dtype=np.int64)}
        info = {"kind": "token_table", "version": TOKEN_TABLE_VERSION, "num_items": len(self),
                "num_tokens": int(self.offsets[-1]), "attributes": list(self.attributes),
                "key": self.key, "identity": dict(self.identity or {}), **(extra or {})}
        return _write_table_folder(Path(directory), arrays, info)

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True) -> "ItemTokenTable":
        directory = Path(directory)
        info_path = directory / "table.json"
        if not info_path.is_file():
            raise TableError(f"no token table at {directory} (missing table.json); build it with "
                             f"`reolm tables tokens`")
        info = json.loads(info_path.read_text())
        mode = "r" if mmap else None
        return cls(np.load(directory / "ids.npy", mmap_mode=mode),
                   np.load(directory / "types.npy", mmap_mode=mode),
                   np.load(directory / "word_starts.npy", mmap_mode=mode),
                   np.load(directory / "offsets.npy"),
                   tuple(info.get("attributes", ())), info.get("key", ""), info.get("identity") or None)


def build_token_table(items: Iterable[Mapping[str, str]], tokenizer: Any, attributes: Sequence[str],
                      max_attr_tokens: int = 32, progress: bool = False,
                      total: int | None = None) -> ItemTokenTable:
    """Tokenise every item (attribute dicts in item-index order) into a table."""
    identity = tokenizer_identity(tokenizer, attributes, max_attr_tokens)
    iterator: Iterable[Mapping[str, str]] = items
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(items, total=total, desc="tokenising items", unit="item")
    rows = (tokenize_item(tokenizer, attrs, attributes, max_attr_tokens) for attrs in iterator)
    return ItemTokenTable.from_lists(rows, attributes, key_of_identity(identity), identity)


@dataclass
class ImageFeatureTable:
    """Per-item image features (float16) and a has-image mask."""

    features: np.ndarray   # float16 [N, d]
    has_image: np.ndarray  # bool [N]
    key: str = ""     # vision_model_key of the checkpoint that computed the features ('' = unknown)
    vision: str = ""  # where that checkpoint was (informative: the key is what identifies it)

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise TableError(f"image features must be 2-D [items, dim], got shape {self.features.shape}")
        if len(self.has_image) != len(self.features):
            raise TableError(f"has_image has {len(self.has_image)} rows for {len(self.features)} feature rows")

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def save(self, directory: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
        arrays = {"features": np.asarray(self.features, dtype=np.float16),
                  "has_image": np.asarray(self.has_image, dtype=bool)}
        info = {"kind": "image_table", "num_items": len(self), "dim": self.dim, "key": self.key,
                "vision": self.vision, "num_with_image": int(np.asarray(self.has_image).sum()), **(extra or {})}
        return _write_table_folder(Path(directory), arrays, info)

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True) -> "ImageFeatureTable":
        directory = Path(directory)
        if not (directory / "table.json").is_file():
            raise TableError(f"no image feature table at {directory} (missing table.json); build it with "
                             f"`reolm tables images`")
        info = json.loads((directory / "table.json").read_text())
        return cls(np.load(directory / "features.npy", mmap_mode="r" if mmap else None),
                   np.load(directory / "has_image.npy"), info.get("key", ""), str(info.get("vision", "")))

    @classmethod
    def empty(cls, num_items: int, dim: int) -> "ImageFeatureTable":
        """A table where no item has an image (every item uses the void image)."""
        return cls(np.zeros((num_items, dim), dtype=np.float16), np.zeros(num_items, dtype=bool))


# ----------------------------------------------------------------------------- vision identity

@dataclass(frozen=True)
class VisionIdentity:
    """Which vision checkpoint computed a set of image features (``key``: :func:`vision_model_key`).

    ``key == ""`` means the features' origin is not known (imported features, or a record
    written before identities were kept); then nothing can be compared but the width.
    """

    key: str
    model: str = ""  # where the checkpoint was when the features were computed (informative)
    dim: int = 0

    @property
    def known(self) -> bool:
        return bool(self.key)

    def describe(self) -> str:
        if not self.known:
            return "an unrecorded vision model"
        return f"vision model {self.key}" + (f" ({self.model})" if self.model else "")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "model": self.model, "dim": self.dim}

    @classmethod
    def of_table(cls, table: ImageFeatureTable) -> "VisionIdentity":
        return cls(table.key, table.vision, table.dim)


UNKNOWN_VISION = VisionIdentity("")


class VisionMismatch(TableError):
    """Image features from another vision model than the one the model was trained with."""


def vision_record(identity: VisionIdentity | None) -> dict[str, Any]:
    """``{"vision": ...}`` as checkpoints and exports record it (``null``: no image features)."""
    return {VISION_FIELD: identity.to_dict() if identity is not None else None}


def recorded_vision(record: Mapping[str, Any], where: str) -> VisionIdentity | None:
    """The identity a checkpoint state or export config records; None when it was trained without
    image features, :data:`UNKNOWN_VISION` when it records nothing (written by an older reolm)."""
    if VISION_FIELD not in record:
        return UNKNOWN_VISION
    value = record[VISION_FIELD]
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("key"), str):
        raise TableError(f"{where}: key {VISION_FIELD}: expected {{key, model, dim}} or null, got {value!r}")
    return VisionIdentity(value["key"], str(value.get("model", "")), int(value.get("dim", 0)))


def check_same_vision(trained: VisionIdentity | None, features: VisionIdentity | None, model_where: str,
                      features_where: str) -> None:
    """Refuse ``features`` computed by another vision model than the one ``trained`` names.

    Nothing to compare when either side has no image features or the features' origin is
    unknown; a model that records no identity (an older checkpoint) loads with a warning.
    """
    if trained is None or features is None:
        return
    if not trained.known:
        log.warning("%s records no vision model (written by an older reolm): cannot check that the image "
                    "features of %s come from the model it was trained with", model_where, features_where)
        return
    if features.known and features.key != trained.key:
        raise VisionMismatch(f"{model_where} was trained on image features of {trained.describe()}, but the "
                             f"features of {features_where} come from {features.describe()}: compute them with "
                             f"the same model (`reolm tables images --vision ...`)")


# ----------------------------------------------------------------------------- a run's tables

@dataclass(frozen=True)
class ItemTables:
    """The token and image tables a run reads, row for row, and the vision model behind the images.

    ``vision`` is None when there are no image features (``images`` is then all void).
    """

    tokens: ItemTokenTable
    images: ImageFeatureTable
    vision: VisionIdentity | None

    @property
    def num_items(self) -> int:
        return len(self.tokens)

    @classmethod
    def checked(cls, tokens: ItemTokenTable, images: ImageFeatureTable | None, image_feature_dim: int,
                where: object) -> "ItemTables":
        """Both tables, refused when the image rows or width do not fit (``where``: the image table, for
        the message); without an image table every item uses the void image."""
        vision = VisionIdentity.of_table(images) if images is not None else None
        if images is None:
            images = ImageFeatureTable.empty(len(tokens), image_feature_dim)
        if images.dim != image_feature_dim:
            raise TableError(f"model.image_feature_dim={image_feature_dim} but the image table {where} holds "
                             f"{images.dim}-d features")
        if len(images) != len(tokens):
            raise TableError(f"image table {where} has {len(images)} rows, the token table {len(tokens)}")
        return cls(tokens, images, vision)


# ----------------------------------------------------------------------------- batched builder

DEFAULT_BATCH = 4096


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The HF tokenizer of a local directory: a tokenizer, an HF checkpoint or a Reo-LM export
    (never downloads; the one loader every stage uses, so all of them tokenize alike)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not path.is_dir():
        raise TableError(f"tokenizer directory not found: {path} (train one with `reolm tokenizer train`)")
    # An export's config.json says model_type "reolm", which transformers does not know; it warns
    # on every load although only the tokenizer files are read. Silence that one call.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise TableError(f"{path}: cannot load its tokenizer with AutoTokenizer: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _word_starts(word_ids: Sequence[int | None]) -> list[int]:
    return [1 if i == 0 or w is None or w != word_ids[i - 1] else 0 for i, w in enumerate(word_ids)]


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[Any]:
    """``tokenizer(texts, add_special_tokens=False).encodings``, without transformers' per-text dicts.

    The HF fast tokenizer's ``__call__`` calls the backend's ``encode_batch`` after
    switching off truncation and padding; when the backend has neither configured we
    call it directly (about twice as fast on a million items), else we go through HF.
    """
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:
        return backend.encode_batch(texts, add_special_tokens=False)
    return tokenizer(texts, add_special_tokens=False).encodings


def tokenize_items_batched(tokenizer: Any, items: Sequence[Mapping[str, str]], attributes: Sequence[str],
                           max_attr_tokens: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tokenise a batch of items exactly as ``tokenize_item`` does, item by item.

    Returns (ids int32, types int8, word_starts uint8, lengths int64) for the
    batch concatenated in item order.
    """
    if not getattr(tokenizer, "is_fast", False):  # slow tokenizers have no batched word ids
        rows = [tokenize_item(tokenizer, attrs, attributes, max_attr_tokens) for attrs in items]
        return _rows_to_arrays(rows)
    keys = [_encode_words(tokenizer, name) for name in attributes]
    texts = [" " + (str(attrs.get(name, "") or "").strip() or VOID_VALUE)
             for attrs in items for name in attributes]
    encodings = _encode_batch(tokenizer, texts)
    n_attr = len(attributes)
    ids: list[int] = []
    types: list[int] = []
    starts: list[int] = []
    lengths = np.zeros(len(items), dtype=np.int64)
    for i in range(len(items)):
        before = len(ids)
        for k in range(n_attr):
            enc = encodings[i * n_attr + k]
            key_ids, key_starts = keys[k]
            a_ids = (key_ids + enc.ids)[:max_attr_tokens]
            a_starts = (key_starts + _word_starts(enc.word_ids))[:max_attr_tokens]
            if a_starts:
                a_starts[0] = 1
            ids += a_ids
            starts += a_starts
            types += [k + 1] * len(a_ids)
        lengths[i] = len(ids) - before
    return (np.asarray(ids, dtype=np.int32), np.asarray(types, dtype=np.int8),
            np.asarray(starts, dtype=np.uint8), lengths)


def _rows_to_arrays(rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    flat = lambda k, dt: np.asarray([t for r in rows for t in r[k]], dtype=dt)  # noqa: E731
    return flat(0, np.int32), flat(1, np.int8), flat(2, np.uint8), np.asarray([len(r[0]) for r in rows],
                                                                                dtype=np.int64)


def _batches(items: Iterable[Mapping[str, str]], size: int) -> Iterator[list[Mapping[str, str]]]:
    batch: list[Mapping[str, str]] = []
    for attrs in items:
        batch.append(attrs)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def build_token_table_batched(items: Iterable[Mapping[str, str]], tokenizer: Any, attributes: Sequence[str],
                              max_attr_tokens: int = 32, batch_size: int = DEFAULT_BATCH,
                              progress: bool = False, total: int | None = None) -> ItemTokenTable:
    """Same table as ``build_token_table``, built batch by batch into numpy chunks."""
    from tqdm.auto import tqdm

    chunks: list[tuple[np.ndarray, ...]] = []
    bar = tqdm(total=total, desc="tokenising items", unit="item", disable=not progress)
    for batch in _batches(items, batch_size):
        chunks.append(tokenize_items_batched(tokenizer, batch, attributes, max_attr_tokens))
        bar.update(len(batch))
    bar.close()
    if not chunks:
        chunks = [(np.zeros(0, np.int32), np.zeros(0, np.int8), np.zeros(0, np.uint8), np.zeros(0, np.int64))]
    offsets = np.zeros(sum(len(c[3]) for c in chunks) + 1, dtype=np.int64)
    np.cumsum(np.concatenate([c[3] for c in chunks]), out=offsets[1:])
    identity = tokenizer_identity(tokenizer, attributes, max_attr_tokens)
    return ItemTokenTable(np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]),
                          np.concatenate([c[2] for c in chunks]), offsets, tuple(attributes),
                          key_of_identity(identity), identity)

