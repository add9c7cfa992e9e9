"""Item sources and their tables: the one place that opens a corpus and finds what was derived from it.

A *source* is a WebDataset corpus (``manifest.json``, opened through
:func:`reolm.data.shards.load_manifest` and its format-version check) or a processed domain
folder (``domain.json``).  Its derived tables live next to it (``shards/README.md``)::

    ROOT/tables/tokens-<tokenizer_key>/   rows = global item index (corpus) or item index (domain)
    CORPUS/tables/images-<vision_key>/    the image features one vision checkpoint computed
    DOMAIN/image_features.npy + image_features.json (the vision key and path)

A token table is found by the identity of the tokenizer (several tokenizers share a source; a
table not found says which part of each existing table's identity differs).  An image table
is found by the vision model that made it, read from its ``table.json``: the
:class:`~reolm.data.tables.VisionIdentity` of the features (defined with the tables) travels
with the model into checkpoints and exports.  :meth:`Corpus.item_tables` is what a
pre-training run reads: both tables of one tokenizer and one vision model, checked together.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from reolm.data.tables import (DEFAULT_BATCH, UNKNOWN_VISION, ImageFeatureTable, ItemTables, ItemTokenTable,
                               TableError, VisionIdentity, build_token_table_batched, identity_difference,
                               key_of_identity, tokenizer_identity, vision_model_key)

__all__ = ["Corpus", "domain_vision", "source_attributes", "iter_source_items", "token_table_dir",
           "image_table_dir", "build_source_token_table", "MissingTokenTable", "why_no_token_table",
           "find_token_table", "find_image_table", "domain_token_table", "domain_image_table"]

if TYPE_CHECKING:
    from reolm.data.domain import Domain

log = logging.getLogger(__name__)

NO_TABLES_YET = "no token table has been built there yet"


# ----------------------------------------------------------------------------- sources

def domain_vision(domain_path: str | os.PathLike | None) -> VisionIdentity:
    """The identity of a domain folder's ``image_features.npy`` (from ``image_features.json``)."""
    if domain_path is None:
        return UNKNOWN_VISION
    path = Path(domain_path) / "image_features.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):  # imported features carry no record: origin unknown
        return UNKNOWN_VISION
    return VisionIdentity(str(info.get("key") or ""), str(info.get("vision", "")), int(info.get("dim", 0) or 0))

def _is_corpus(root: Path) -> bool:
    return (root / "manifest.json").is_file()


def source_attributes(root: str | os.PathLike) -> list[str]:
    """Attribute order of a corpus (manifest) or a processed domain folder (domain.json)."""
    from reolm.data.domain import DEFAULT_ATTRIBUTES, read_domain_info

    root = Path(root)
    if _is_corpus(root):
        return Corpus.open(root).attributes
    if (root / "domain.json").is_file():
        return list(read_domain_info(root).get("attributes", DEFAULT_ATTRIBUTES))
    if (root / "smap.json").is_file():
        return list(DEFAULT_ATTRIBUTES)
    raise TableError(f"{root} is neither a shard corpus (manifest.json) nor a processed domain folder")


def iter_source_items(root: str | os.PathLike) -> tuple[int, Iterator[dict[str, str]]]:
    """(number of items, attribute dicts in row order) of a corpus or a domain folder."""
    from reolm.data.domain import read_domain

    root = Path(root)
    if _is_corpus(root):
        corpus = Corpus.open(root)
        return corpus.num_items, corpus.item_attributes()
    domain = read_domain(root, load_features=False)
    ids = domain.item_ids()
    return domain.num_items, (domain.item_attributes(i, ids) for i in range(domain.num_items))


def token_table_dir(root: str | os.PathLike, key: str) -> Path:
    return Path(root) / "tables" / f"tokens-{key}"


def image_table_dir(corpus: str | os.PathLike, key: str) -> Path:
    return Path(corpus) / "tables" / f"images-{key}"


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
                     mmap: bool = True, attributes: list[str] | None = None) -> ItemTokenTable:
    """Load the token table of ``tokenizer`` under a corpus or domain folder (memory-mapped).

    ``attributes``: the source's attribute order when the caller already has it (an opened
    :class:`Corpus`), so the manifest is not read a second time."""
    identity = tokenizer_identity(tokenizer, attributes if attributes is not None else source_attributes(root),
                                  max_attr_tokens)
    directory = token_table_dir(root, key_of_identity(identity))
    if not (directory / "table.json").is_file():
        flag = "corpus" if _is_corpus(Path(root)) else "domain"
        reason = why_no_token_table(root, identity)
        raise MissingTokenTable(f"no token table for this tokenizer under {root} (expected {directory}: "
                                f"{reason}); build it with `reolm tables tokens --tokenizer DIR --{flag} {root}`",
                                reason, others=reason != NO_TABLES_YET)
    return ItemTokenTable.load(directory, mmap=mmap)


def find_image_table(corpus: str | os.PathLike, vision_dir: str | os.PathLike) -> ImageFeatureTable:
    """Load the image feature table of the vision checkpoint ``vision_dir`` under a corpus (memory-mapped)."""
    return Corpus.open(corpus).image_table(vision_model_key(vision_dir), vision_dir)


# ----------------------------------------------------------------------------- a domain's tables

def domain_token_table(domain: "Domain", tokenizer: Any, max_attr_tokens: int, progress: bool = True
                       ) -> ItemTokenTable:
    """The domain's token table for ``tokenizer``; built into ``DIR/tables/`` when missing."""
    def in_memory() -> ItemTokenTable:
        ids = domain.item_ids()
        rows = (domain.item_attributes(i, ids) for i in range(domain.num_items))
        return build_token_table_batched(rows, tokenizer, domain.attributes, max_attr_tokens,
                                         progress=progress, total=domain.num_items)

    if domain.path is None:  # an in-memory domain: tokenise without saving
        return in_memory()
    try:
        table = find_token_table(domain.path, tokenizer, max_attr_tokens)
    except MissingTokenTable as missing:
        # A first build is routine; one next to tables of other identities deserves a reason.
        (log.warning if missing.others else log.info)(
            "building the token table under %s for this tokenizer: %s", domain.path, missing.reason)
        try:
            build_source_token_table(domain.path, tokenizer, max_attr_tokens, progress=progress)
        except OSError as err:  # a read-only dataset folder: tokenise for this process only
            log.warning("cannot write the token table under %s (%s); tokenising in memory", domain.path, err)
            return in_memory()
        table = find_token_table(domain.path, tokenizer, max_attr_tokens)
    if len(table) != domain.num_items:
        raise TableError(f"token table under {domain.path}/tables has {len(table)} items but the domain has "
                         f"{domain.num_items}: rebuild it with `reolm tables tokens`")
    return table


def domain_image_table(domain: "Domain", image_feature_dim: int) -> ImageFeatureTable:
    """``image_features.npy`` + ``has_image.npy`` with the vision model that computed them, or (no
    features) every item on the void image."""
    where = domain.path or domain.name
    if domain.image_features is None:
        # A broadcast view: no num_items x d allocation, rows gathered by the collator are zeros.
        zeros = np.broadcast_to(np.zeros((1, image_feature_dim), np.float16), (domain.num_items, image_feature_dim))
        return ImageFeatureTable(zeros, np.zeros(domain.num_items, dtype=bool))
    features = domain.image_features
    if features.ndim != 2 or features.shape[0] != domain.num_items:
        raise TableError(f"{where}/image_features.npy has shape {tuple(features.shape)}, expected "
                         f"[{domain.num_items}, d]")
    if features.shape[1] != image_feature_dim:
        raise TableError(f"{where}/image_features.npy has d={features.shape[1]} but the model's image MLP "
                         f"takes d={image_feature_dim} (model.image_feature_dim): the features come from "
                         f"another vision model than the one used in pre-training")
    has_image = domain.has_image if domain.has_image is not None else np.ones(domain.num_items, dtype=bool)
    vision = domain_vision(domain.path)
    return ImageFeatureTable(features, np.asarray(has_image, dtype=bool), vision.key, vision.model)


# ----------------------------------------------------------------------------- the corpus

class Corpus:
    """An opened shard corpus: its manifest (format-checked) and the tables derived from it."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Corpus":
        """Read ``ROOT/manifest.json`` through the shard format's checks (a ShardError names the key)."""
        from reolm.data.shards import load_manifest

        return cls(Path(root), load_manifest(root))

    @property
    def attributes(self) -> list[str]:
        return list(self.manifest["attributes"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    def shards(self, split: str) -> list[str]:
        """Paths of the ``split`` shards (items/train/dev) the manifest lists; a ShardError when none."""
        from reolm.data.shards import ShardError

        entries = self.manifest["shards"][split]
        if not entries:
            raise ShardError(f"{self.root / 'manifest.json'}: no '{split}' shards listed")
        return [str(self.root / e["path"]) for e in entries]

    def shard_counts(self) -> dict[str, int]:
        """{absolute shard path: sample count} of every shard the manifest lists."""
        return {os.path.abspath(self.root / e["path"]): e["count"]
                for entries in self.manifest["shards"].values() for e in entries}

    def item_attributes(self) -> Iterator[dict[str, str]]:
        """Every item's attribute dict in global index order (item shards out of order: TableError)."""
        from reolm.data.shards import iter_items

        attributes = self.attributes
        for expected, record in enumerate(iter_items(self.root)):
            if record["index"] != expected:
                raise TableError(f"{self.root}: items shards out of order at item {expected} "
                                 f"(found {record['index']}); run `reolm verify {self.root}`")
            attrs = record.get("attributes", {})
            yield {a: str(attrs.get(a, "") or "") for a in attributes}

    def token_table(self, tokenizer: Any, max_attr_tokens: int = 32, mmap: bool = True) -> ItemTokenTable:
        """The token table of ``tokenizer`` (memory-mapped); MissingTokenTable says how to build it."""
        return find_token_table(self.root, tokenizer, max_attr_tokens, mmap, self.attributes)

    def image_tables(self) -> dict[Path, dict[str, Any]]:
        """{folder: its table.json} of every complete image table (a build in progress has none yet)."""
        found: dict[Path, dict[str, Any]] = {}
        for folder in sorted((self.root / "tables").glob("images-*")):
            try:
                found[folder] = json.loads((folder / "table.json").read_text())
            except (OSError, ValueError):
                continue
        return found

    def image_table(self, key: str | None = None, vision_dir: str | os.PathLike | None = None
                    ) -> ImageFeatureTable | None:
        """The image table the vision model ``key`` made; without a key, the corpus' only image table
        (None if it has none).  Several tables and no key is an error naming each table's vision model.
        """
        tables = self.image_tables()
        if key is not None:
            mine = [folder for folder, info in tables.items() if info.get("key") == key]
            if not mine:
                what = vision_dir or f"vision model {key}"
                build = f" --vision {vision_dir}" if vision_dir else ""
                raise TableError(f"no image features of {what} under {self.root} (expected "
                                 f"{image_table_dir(self.root, key)}); build them with `reolm tables images{build} "
                                 f"--corpus {self.root}`")
            return ImageFeatureTable.load(mine[0])
        if len(tables) > 1:
            listing = ", ".join(f"{folder.name} ({info.get('vision') or 'vision model not recorded'})"
                                for folder, info in tables.items())
            raise TableError(f"{self.root}/tables has several image tables ({listing}); choose one with "
                             f"data.image_table=PATH")
        return ImageFeatureTable.load(next(iter(tables))) if tables else None

    def item_tables(self, tokenizer: Any, max_attr_tokens: int, image_feature_dim: int, *,
                    vision_key: str | None = None, vision_dir: str | os.PathLike | None = None,
                    token_dir: str = "", image_dir: str = "") -> ItemTables:
        """The tables a run on this corpus reads, checked against each other.

        Tokens: the folder ``token_dir`` if given, else this corpus' table of ``tokenizer`` and
        ``max_attr_tokens`` (never one built with another tokenizer).  Images: the folder
        ``image_dir`` if given, else the table of the vision model ``vision_key`` (``vision_dir``:
        its folder, for the messages), else the corpus' only image table, else none (every item
        uses the void image).
        """
        tokens = ItemTokenTable.load(token_dir) if token_dir else self.token_table(tokenizer, max_attr_tokens)
        if image_dir:
            images = ImageFeatureTable.load(image_dir)
        else:
            images = self.image_table(vision_key, vision_dir)
        return ItemTables.checked(tokens, images, image_feature_dim, image_dir or self.root / "tables")
