"""Builders for the derived token table: from a shard corpus or from a processed domain folder.

The table layout and the per-item rendering are defined in
:mod:`reolm.data.item_table`; this module adds a **batched** tokeniser that is
identical to :func:`~reolm.data.item_table.tokenize_item` item for item (tested)
but sends whole batches of attribute values through the fast tokenizer at once
and builds the ragged arrays chunk by chunk in numpy, so a million-item corpus
is tokenised in minutes and without Python lists of every token.

Where tables live (``shards/README.md``): ``CORPUS/tables/tokens-<key>/`` with rows
= global item index, and ``DOMAIN/tables/tokens-<key>/`` with rows = item index.
``<key>`` is :func:`~reolm.data.item_table.tokenizer_key` (what decides the token ids:
vocabulary, normaliser, pre-tokeniser, post-processor, special and added tokens; plus the
attribute order and per-attribute token cap), so several tokenizers share a corpus.  Each
``table.json`` records the parts of that identity, so a table that is not found for a
tokenizer is explained ("tokens-… differs in: normalizer").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from reolm.data.item_table import (VOID_VALUE, ItemTokenTable, TableError, _encode_words, identity_difference,
                                   key_of_identity, tokenize_item, tokenizer_identity)

__all__ = [
    "tokenize_items_batched",
    "build_token_table_batched",
    "build_source_token_table",
    "token_table_dir",
    "find_token_table",
    "why_no_token_table",
    "MissingTokenTable",
    "source_attributes",
    "iter_source_items",
    "load_tokenizer",
]

DEFAULT_BATCH = 4096
NO_TABLES_YET = "no token table has been built there yet"


def load_tokenizer(path: str | os.PathLike) -> Any:
    """An HF tokenizer from a local directory (never downloads)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise TableError(f"tokenizer directory not found: {path} (train one with `reolm tokenizer train`)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


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


# ----------------------------------------------------------------------------- sources

def _is_corpus(root: Path) -> bool:
    return (root / "manifest.json").is_file()


def source_attributes(root: str | os.PathLike) -> list[str]:
    """Attribute order of a corpus (manifest) or a processed domain folder (domain.json)."""
    from reolm.data.domain import DEFAULT_ATTRIBUTES, read_domain_info
    from reolm.data.shards import load_manifest

    root = Path(root)
    if _is_corpus(root):
        return list(load_manifest(root)["attributes"])
    if (root / "domain.json").is_file():
        return list(read_domain_info(root).get("attributes", DEFAULT_ATTRIBUTES))
    if (root / "smap.json").is_file():
        return list(DEFAULT_ATTRIBUTES)
    raise TableError(f"{root} is neither a shard corpus (manifest.json) nor a processed domain folder")


def iter_source_items(root: str | os.PathLike) -> tuple[int, Iterator[dict[str, str]]]:
    """(number of items, attribute dicts in row order) of a corpus or a domain folder."""
    from reolm.data.domain import read_domain
    from reolm.data.shards import iter_items, load_manifest

    root = Path(root)
    attributes = source_attributes(root)
    if _is_corpus(root):
        total = int(load_manifest(root)["num_items"])

        def corpus_rows() -> Iterator[dict[str, str]]:
            for expected, record in enumerate(iter_items(root)):
                if record["index"] != expected:
                    raise TableError(f"{root}: items shards out of order at item {expected} "
                                     f"(found {record['index']}); run `reolm verify {root}`")
                attrs = record.get("attributes", {})
                yield {a: str(attrs.get(a, "") or "") for a in attributes}
        return total, corpus_rows()
    domain = read_domain(root, load_features=False)
    ids = domain.item_ids()
    return domain.num_items, (domain.item_attributes(i, ids) for i in range(domain.num_items))


def token_table_dir(root: str | os.PathLike, key: str) -> Path:
    return Path(root) / "tables" / f"tokens-{key}"


def build_source_token_table(root: str | os.PathLike, tokenizer: Any, max_attr_tokens: int = 32,
                             batch_size: int = DEFAULT_BATCH, progress: bool = True) -> Path:
    """Tokenise every item of a corpus or domain folder into ``ROOT/tables/tokens-<key>/``."""
    attributes = source_attributes(root)
    total, rows = iter_source_items(root)
    table = build_token_table_batched(rows, tokenizer, attributes, max_attr_tokens, batch_size, progress, total)
    if len(table) != total:
        raise TableError(f"{root}: read {len(table)} items, expected {total}")
    return table.save(token_table_dir(root, table.key),
                      extra={"tokenizer": str(getattr(tokenizer, "name_or_path", "")),
                             "max_attr_tokens": max_attr_tokens, "source": str(root)})


class MissingTokenTable(TableError):
    """No token table for this tokenizer; ``reason`` says why, ``others`` whether tables of other
    identities exist (then building one is a rebuild, worth a warning)."""

    def __init__(self, message: str, reason: str, others: bool):
        super().__init__(message)
        self.reason = reason
        self.others = others


def why_no_token_table(root: str | os.PathLike, identity: dict[str, str]) -> str:
    """Why ``root`` holds no token table for ``identity``: none at all, or which parts of each
    existing table's identity differ (so a rebuild says what changed)."""
    tables = sorted(p for p in (Path(root) / "tables").glob("tokens-*") if (p / "table.json").is_file())
    if not tables:
        return NO_TABLES_YET
    reasons = []
    for directory in tables:
        try:
            recorded = json.loads((directory / "table.json").read_text()).get("identity") or {}
        except (OSError, ValueError) as err:
            reasons.append(f"{directory.name} is unreadable ({err})")
            continue
        if not recorded:
            reasons.append(f"{directory.name} predates recorded tokenizer identities")
        else:
            reasons.append(f"{directory.name} differs in: {', '.join(identity_difference(identity, recorded))}")
    return "; ".join(reasons)


def find_token_table(root: str | os.PathLike, tokenizer: Any, max_attr_tokens: int = 32,
                     mmap: bool = True) -> ItemTokenTable:
    """Load the token table of ``tokenizer`` under a corpus or domain folder (memory-mapped)."""
    identity = tokenizer_identity(tokenizer, source_attributes(root), max_attr_tokens)
    directory = token_table_dir(root, key_of_identity(identity))
    if not (directory / "table.json").is_file():
        flag = "corpus" if _is_corpus(Path(root)) else "domain"
        reason = why_no_token_table(root, identity)
        raise MissingTokenTable(f"no token table for this tokenizer under {root} (expected {directory}: "
                                f"{reason}); build it with `reolm tables tokens --tokenizer DIR --{flag} {root}`",
                                reason, others=reason != NO_TABLES_YET)
    return ItemTokenTable.load(directory, mmap=mmap)
