"""Interop with processed data from Recformer and UniSRec / MISSRec (RecBole atomic files).

Recformer (github.com/AaronHeee/RecFormer, ``finetune_data/process.py``) ships a folder with
``train.json`` {user_idx: [item_idx, ...]}, ``val.json`` / ``test.json`` {user_idx: [item_idx]},
``smap.json`` {asin: item_idx}, ``umap.json`` {reviewerID: user_idx} and ``meta_data.json``
{asin: {"title", "brand", "category"}}; indices are 0-based and dense (its ``LabelField``).
Users with fewer than 3 interactions appear in ``train.json`` only.  ``meta_data.json`` may list
more items than ``smap.json`` (Recformer filters it when loading).  Its texts keep the HTML
entities of the Amazon metadata (``&quot;``, ``&amp;``: about 29% of a real domain's items; each
entity costs the tokenizer several tokens), so the import unescapes them by default, as
``reolm prepare amazon`` does, and records the choice in ``domain.json``.

UniSRec (github.com/RUCAIBox/UniSRec, ``dataset/preprocessing/process_amazon.py``) writes
``NAME.train.inter`` / ``.valid.inter`` / ``.test.inter`` with the header
``user_id:token<TAB>item_id_list:token_seq<TAB>item_id:token``, where tokens are the 0-based
indices of ``NAME.user2index`` / ``NAME.item2index`` (``raw_id<TAB>index`` lines).  The train file
is *augmented*: for a train sequence s of length L it has one row per target s[L-k], k = 1..L-1,
with history s[:L-k][-50:].  ``NAME.text`` (``item_id:token<TAB>text:token_seq``) holds one cleaned
"title. category. brand." string per raw item id.  ``NAME.feat1CLS`` (text PLM embeddings) and,
from MISSRec (github.com/gimpong/MM23-MISSRec), ``NAME.feat3CLS`` (image embeddings, all-zero row
= no image) are raw float32 ``[num_items, d]`` in index order.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from reolm.data.domain import DEFAULT_ATTRIBUTES, Domain, _int_keyed, read_domain, read_json
from reolm.data.ingest_report import IngestReport
from reolm.io import atomic_open, atomic_path

__all__ = ["InteropError", "import_recformer", "import_unisrec", "export_unisrec", "rebuild_sequence",
           "INTER_HEADER"]

INTER_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"
TEXT_HEADER = "item_id:token\ttext:token_seq"


class InteropError(ValueError):
    """Foreign processed data is missing a file or is inconsistent (the message says where)."""


# ----------------------------------------------------------------------------- shared assembly

@dataclass
class _Splits:
    train: dict[int, list[int]] = field(default_factory=dict)
    val: dict[int, list[int]] = field(default_factory=dict)
    test: dict[int, list[int]] = field(default_factory=dict)


def _assemble(name: str, splits: _Splits, item_ids: list[str], user_ids: Mapping[int, str],
              meta: dict[str, dict[str, str]], report: IngestReport, source: dict[str, Any]) -> Domain:
    """A valid Domain from imported splits: users without a train sequence dropped, users re-indexed densely."""
    for split_name, split in (("val", splits.val), ("test", splits.test)):
        for user in [u for u in split if not splits.train.get(u)]:
            report.drop(f"{split_name}_user_without_train_sequence", f"user {user}")
            del split[user]
    for user in [u for u, seq in splits.train.items() if not seq]:
        report.drop("user_with_empty_train_sequence", f"user {user}")
        del splits.train[user]
    old_users = sorted(splits.train)
    new_of = {old: new for new, old in enumerate(old_users)}
    train = {new_of[u]: splits.train[u] for u in old_users}
    val = {new_of[u]: s for u, s in splits.val.items() if s}
    test = {new_of[u]: s for u, s in splits.test.items() if s}
    umap: dict[str, int] = {}
    for old in old_users:
        user_id = user_ids.get(old, str(old))
        if user_id in umap:
            raise InteropError(f"user id {user_id!r} names two users ({umap[user_id]} and {new_of[old]})")
        umap[user_id] = new_of[old]
    smap = {item_id: i for i, item_id in enumerate(item_ids)}
    missing = [i for i in item_ids if i not in meta]
    if missing:
        report.note(f"{len(missing)} item(s) have no text attributes (kept with empty text), e.g. {missing[:3]}")
    attributes = list(DEFAULT_ATTRIBUTES)
    for attrs in meta.values():
        attributes.extend(a for a in attrs if a not in attributes)
    meta_out = {i: {a: meta.get(i, {}).get(a, "") for a in attributes} for i in item_ids}
    domain = Domain(name=name, train=train, val=val, test=test, smap=smap, umap=umap, meta=meta_out,
                    attributes=attributes)
    train_only = sum(1 for u in train if u not in val and u not in test)
    if train_only:
        report.note(f"{train_only} user(s) have a train sequence but no val/test item (kept for training)")
    report.kept.update(users=domain.num_users, items=domain.num_items, interactions=domain.num_interactions())
    domain.extra["ingest"] = source
    return domain


def _attribute_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(_attribute_text(v) for v in value if v is not None)
    return str(value)


# ----------------------------------------------------------------------------- Recformer

def _dense_index(mapping: Mapping[str, Any], path: Path, report: IngestReport, what: str) -> dict[int, int]:
    """old index -> 0-based dense index, accepting 0-based, 1-based or gapped indices (noted)."""
    flags = [k for k, v in mapping.items() if isinstance(v, bool)]
    if flags:  # int(true) == 1: a JSON boolean would silently become index 1
        raise InteropError(f"{path}: {what} {flags[0]!r}: index must be an integer, got a boolean")
    try:
        values = sorted({int(v) for v in mapping.values()})
    except (TypeError, ValueError):
        raise InteropError(f"{path}: {what} indices must be integers") from None
    if len(values) != len(mapping):
        raise InteropError(f"{path}: two {what}s share an index")
    if values and values[0] != 0:
        report.note(f"{path.name}: {what} indices start at {values[0]}; shifted to 0-based")
    if values and values[-1] - values[0] + 1 != len(values):
        report.note(f"{path.name}: {what} indices have gaps; re-indexed densely in index order")
    return {old: new for new, old in enumerate(values)}


def _read_split(path: Path, item_of: Mapping[int, int], report: IngestReport) -> dict[int, list[int]]:
    """One of Recformer's {user_idx: [item_idx, ...]} files, item indices mapped to ours."""
    out: dict[int, list[int]] = {}
    for user, items in _int_keyed(path, read_json(path)).items():
        out[user] = [item_of[i] for i in items if i in item_of]
        for item in (i for i in items if i not in item_of):
            report.drop("interaction_of_item_not_in_smap", f"{path.name}: user {user}, item {item}")
    return out


def import_recformer(source: str | os.PathLike, name: str, report: IngestReport | None = None,
                     unescape_html: bool = True) -> tuple[Domain, IngestReport]:
    """A Domain from a Recformer processed folder (see the module docstring for the layout);
    ``unescape_html`` turns entities such as ``&quot;`` into the characters they stand for."""
    source = Path(source)
    report = report or IngestReport()
    smap_raw = read_json(source / "smap.json")
    if not isinstance(smap_raw, dict):
        raise InteropError(f"{source / 'smap.json'}: expected an object {{item_id: item_idx}}")
    item_of = _dense_index(smap_raw, source / "smap.json", report, "item")
    item_ids = [""] * len(item_of)
    for item_id, old in smap_raw.items():
        item_ids[item_of[int(old)]] = str(item_id)
    report.read["items"] = len(item_ids)
    splits = _Splits(*(_read_split(source / f"{s}.json", item_of, report) for s in ("train", "val", "test")))
    for split_name in ("train", "val", "test"):
        split = getattr(splits, split_name)
        report.read[f"{split_name}_users"] = len(split)
        report.read[f"{split_name}_interactions"] = sum(len(s) for s in split.values())
    user_ids: dict[int, str] = {}
    if (source / "umap.json").is_file():
        umap_raw = read_json(source / "umap.json")
        user_ids = {int(v): str(k) for k, v in umap_raw.items()}
    else:
        report.note("no umap.json: user ids are the user indices")
    meta_raw = read_json(source / "meta_data.json")
    if not isinstance(meta_raw, dict):
        raise InteropError(f"{source / 'meta_data.json'}: expected an object {{item_id: {{attr: value}}}}")
    report.read["meta_items"] = len(meta_raw)
    known = set(item_ids)
    meta: dict[str, dict[str, str]] = {}
    unescaped = 0
    for item_id, attrs in meta_raw.items():
        if item_id not in known:
            report.drop("meta_of_item_not_in_smap")  # Recformer's meta covers all items of the category
            continue
        if not isinstance(attrs, dict):
            report.drop("meta_entry_not_an_object", f"meta_data.json: {item_id}")
            continue
        text = {str(a): _attribute_text(v) for a, v in attrs.items()}
        meta[item_id] = {a: html.unescape(t) for a, t in text.items()} if unescape_html else text
        unescaped += meta[item_id] != text
    if unescaped:
        report.note(f"unescaped HTML entities in the text of {unescaped} item(s) (--no-unescape-html keeps them)")
    domain = _assemble(name, splits, item_ids, user_ids, meta, report,
                       {"source": "recformer", "path": str(source.resolve()),
                        "options": {"unescape_html": bool(unescape_html)}})
    return domain, report


# ----------------------------------------------------------------------------- UniSRec: reading

def _read_index_file(path: Path) -> dict[str, int]:
    """``raw_id<TAB>index`` lines (UniSRec's .user2index / .item2index)."""
    out: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            raw_id, sep, index = line.rpartition("\t")
            if not sep or not index.strip().lstrip("-").isdigit():
                raise InteropError(f"{path}:{lineno}: expected 'raw_id<TAB>index', got {line[:80]!r}")
            if raw_id in out:
                raise InteropError(f"{path}:{lineno}: {raw_id!r} listed twice")
            out[raw_id] = int(index)
    return out


@dataclass
class _InterRow:
    user: str
    history: list[str]
    target: str


def _read_inter(path: Path, report: IngestReport) -> dict[str, list[_InterRow]]:
    """Rows of one atomic .inter file grouped by user token, in file order."""
    rows: dict[str, list[_InterRow]] = {}
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        try:
            cols = [header.index(c) for c in INTER_HEADER.split("\t")]
        except ValueError:
            raise InteropError(f"{path}:1: header must have the columns {INTER_HEADER.split(chr(9))}, "
                               f"got {header}") from None
        for lineno, line in enumerate(fh, 2):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != len(header):
                report.drop("malformed_inter_line", f"{path.name}:{lineno}")
                continue
            user, history, target = (parts[c] for c in cols)
            rows.setdefault(user, []).append(_InterRow(user, history.split(), target))
            report.read[f"{path.name.rsplit('.', 2)[-2]}_rows"] += 1
    return rows


def rebuild_sequence(rows: list[_InterRow], where: str) -> list[str]:
    """The train sequence behind UniSRec's augmented rows (or a single history + target row).

    The rows of a sequence s (length L) are, in file order, (s[:L-k][-H:], s[L-k]) for k = 1..L-1,
    so the targets read backwards are s[1:] and the shortest history is [s[0]].  Histories cut
    at H items are why the sequence cannot simply be read off the longest row.  Every row is
    checked against the rebuilt sequence.
    """
    ordered = sorted(rows, key=lambda r: -len(r.history))  # stable: equal (capped) lengths keep file order
    seq = list(ordered[-1].history) + [r.target for r in reversed(ordered)]
    length = len(seq)
    for k, row in enumerate(ordered, 1):
        position = length - k
        expected = seq[:position][-len(row.history):] if row.history else []
        if row.target != seq[position] or row.history != expected:
            raise InteropError(f"{where}: rows do not form one sequence (row with target {row.target} "
                               f"and {len(row.history)} history items disagrees with the others)")
    return seq


def _locate_prefix(source: Path, prefix: str | None) -> str:
    if prefix:
        if not (source / f"{prefix}.train.inter").is_file():
            raise InteropError(f"missing file: {source / f'{prefix}.train.inter'}")
        return prefix
    if (source / f"{source.name}.train.inter").is_file():
        return source.name
    found = sorted(p.name[: -len(".train.inter")] for p in source.glob("*.train.inter"))
    if len(found) != 1:
        raise InteropError(f"{source}: expected one NAME.train.inter file, found {found or 'none'}; "
                           f"pass --prefix NAME")
    return found[0]


def _token_index(tokens: Iterable[str], index_map: Mapping[str, int] | None, path_hint: str
                 ) -> tuple[dict[str, int], list[str]]:
    """token -> dense index and index -> raw id, from an index file or from the tokens themselves."""
    if index_map:
        ordered = sorted(index_map.items(), key=lambda kv: kv[1])
        if [v for _, v in ordered] != list(range(len(ordered))):
            raise InteropError(f"{path_hint}: indices must be exactly 0..{len(ordered) - 1}")
        return {str(v): v for _, v in ordered}, [k for k, _ in ordered]
    unique = sorted(set(tokens), key=lambda t: (not t.isdigit(), int(t) if t.isdigit() else 0, t))
    return {t: i for i, t in enumerate(unique)}, unique


def import_unisrec(source: str | os.PathLike, name: str, prefix: str | None = None,
                   image_suffix: str = "feat3CLS",
                   report: IngestReport | None = None) -> tuple[Domain, IngestReport]:
    """A Domain from UniSRec/MISSRec atomic files (see the module docstring for the layout)."""
    source = Path(source)
    report = report or IngestReport()
    prefix = _locate_prefix(source, prefix)
    base = source / prefix
    inters = {split: _read_inter(Path(f"{base}.{split}.inter"), report) for split in ("train", "valid", "test")
              if Path(f"{base}.{split}.inter").is_file() or split == "train"}
    for split in ("valid", "test"):
        if split not in inters:
            report.note(f"no {prefix}.{split}.inter: no {split} items")
            inters[split] = {}

    item_map = _read_index_file(Path(f"{base}.item2index")) if Path(f"{base}.item2index").is_file() else None
    user_map = _read_index_file(Path(f"{base}.user2index")) if Path(f"{base}.user2index").is_file() else None
    all_item_tokens = (t for rows in inters.values() for rs in rows.values() for r in rs for t in [*r.history, r.target])
    item_index, item_ids = _token_index(all_item_tokens, item_map, f"{base}.item2index")
    user_tokens = {u for rows in inters.values() for u in rows}
    user_index, user_raw = _token_index(user_tokens, user_map, f"{base}.user2index")
    report.read["items"] = len(item_ids)

    splits = _Splits()
    for user in sorted(user_tokens, key=lambda t: user_index.get(t, -1)):
        where = f"{prefix}: user {user}"
        if user not in user_index:
            report.drop("user_not_in_user2index", where)
            continue
        try:
            train_rows = inters["train"].get(user)
            valid_rows = inters["valid"].get(user, [])
            test_rows = inters["test"].get(user, [])
            if len(valid_rows) > 1 or len(test_rows) > 1:
                raise InteropError(f"{where}: more than one valid/test row")
            if train_rows:
                train = rebuild_sequence(train_rows, f"{prefix}.train.inter, user {user}")
            elif valid_rows:
                train = list(valid_rows[0].history)  # a one-item train sequence has no train row
            else:
                report.drop("user_without_train_sequence", where)
                continue
            _check_history(valid_rows, train, f"{prefix}.valid.inter, user {user}")
            val = [r.target for r in valid_rows]
            _check_history(test_rows, train + val, f"{prefix}.test.inter, user {user}")
            test = [r.target for r in test_rows]
            indices = [[item_index[t] for t in part] for part in (train, val, test)]
        except KeyError as err:
            report.drop("user_with_unknown_item_token", f"{where} (item token {err.args[0]})")
            continue
        u = user_index[user]
        splits.train[u], splits.val[u], splits.test[u] = indices

    meta = _read_text_file(Path(f"{base}.text"), item_index, item_ids, report)
    raw_user_of = dict(enumerate(user_raw))
    domain = _assemble(name, splits, item_ids, raw_user_of, meta, report,
                       {"source": "unisrec", "path": str(source.resolve()), "prefix": prefix})
    _attach_feature_file(domain, base, image_suffix, report)
    if Path(f"{base}.feat1CLS").is_file() and image_suffix != "feat1CLS":
        report.note(f"{prefix}.feat1CLS ignored: text PLM embeddings (Reo-LM encodes item text itself)")
    return domain, report


def _check_history(rows: list[_InterRow], before: list[str], where: str) -> None:
    for row in rows:
        if row.history and row.history != before[-len(row.history):]:
            raise InteropError(f"{where}: history does not end the preceding sequence")


def _read_text_file(path: Path, item_index: Mapping[str, int], item_ids: list[str],
                    report: IngestReport) -> dict[str, dict[str, str]]:
    """``NAME.text``: one text per raw item id (or item token); stored as the item's title."""
    meta: dict[str, dict[str, str]] = {}
    if not path.is_file():
        report.note(f"no {path.name}: items have no text")
        return meta
    known = set(item_ids)
    with open(path, encoding="utf-8") as fh:
        fh.readline()  # header: item_id:token text:token_seq
        for lineno, line in enumerate(fh, 2):
            line = line.rstrip("\n")
            if not line:
                continue
            item, _, text = line.partition("\t")
            if item not in known and item in item_index:
                item = item_ids[item_index[item]]  # keyed by token instead of raw id
            if item not in known:
                report.drop("text_of_unknown_item", f"{path.name}:{lineno}")
                continue
            meta[item] = {"title": text.strip()}
    return meta


def _attach_feature_file(domain: Domain, base: Path, suffix: str, report: IngestReport) -> None:
    """MISSRec's raw float32 ``NAME.feat3CLS`` -> image features; all-zero rows mean no image."""
    path = Path(f"{base}.{suffix}")
    if not path.is_file():
        return
    n = domain.num_items
    size = path.stat().st_size
    if n == 0 or size % (4 * n):
        raise InteropError(f"{path}: {size} bytes is not {n} items x d float32 values; the feature rows "
                           f"must match the {n} items of {base}.item2index")
    features = np.fromfile(path, dtype=np.float32).reshape(n, size // (4 * n))
    if not np.isfinite(features).all():
        raise InteropError(f"{path}: contains non-finite values")
    domain.has_image = np.any(features != 0, axis=1)
    domain.image_features = features.astype(np.float16)
    report.kept["items_with_image_features"] = int(domain.has_image.sum())
    report.read["image_feature_dim"] = features.shape[1]


# ----------------------------------------------------------------------------- UniSRec: writing

def _unisrec_text(attrs: Mapping[str, str], attributes: list[str]) -> str:
    """UniSRec's item text: each non-empty attribute without quotes/newlines, ending in one '.'."""
    order = ["title", "category", "brand"] + [a for a in attributes if a not in ("title", "category", "brand")]
    parts = []
    for attr in order:
        value = " ".join(str(attrs.get(attr, "") or "").replace('"', "").split()).rstrip(".")
        if value:
            parts.append(value + ".")
    return " ".join(parts)


def export_unisrec(domain_dir: str | os.PathLike, out: str | os.PathLike, prefix: str | None = None,
                   max_history: int = 50) -> dict[str, int]:
    """Write a processed domain as UniSRec/RecBole atomic files (same splits, same indices)."""
    domain = read_domain(domain_dir)
    prefix = prefix or domain.name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / prefix
    counts = {"train_rows": 0, "valid_rows": 0, "test_rows": 0, "users_without_val_or_test": 0}
    users = sorted(domain.train)

    def row(fh, user: int, history: list[int], target: int) -> None:
        fh.write(f"{user}\t{' '.join(map(str, history[-max_history:]))}\t{target}\n")

    with atomic_open(Path(f"{base}.train.inter")) as fh:
        fh.write(INTER_HEADER + "\n")
        for u in users:
            seq = domain.train[u]
            for k in range(1, len(seq)):
                row(fh, u, seq[:-k], seq[-k])
                counts["train_rows"] += 1
    with atomic_open(Path(f"{base}.valid.inter")) as fh:
        fh.write(INTER_HEADER + "\n")
        for u in users:
            if u in domain.val:
                row(fh, u, domain.train[u], domain.val[u][0])
                counts["valid_rows"] += 1
    with atomic_open(Path(f"{base}.test.inter")) as fh:
        fh.write(INTER_HEADER + "\n")
        for u in users:
            if u in domain.test:
                row(fh, u, domain.train[u] + domain.val.get(u, []), domain.test[u][0])
                counts["test_rows"] += 1
            if u not in domain.val or u not in domain.test:
                counts["users_without_val_or_test"] += 1
    item_ids = domain.item_ids()
    with atomic_open(Path(f"{base}.text")) as fh:
        fh.write(TEXT_HEADER + "\n")
        for item_id in item_ids:
            fh.write(f"{item_id}\t{_unisrec_text(domain.meta.get(item_id, {}), domain.attributes)}\n")
    with atomic_open(Path(f"{base}.item2index")) as fh:
        fh.writelines(f"{item_id}\t{i}\n" for i, item_id in enumerate(item_ids))
    user_of = sorted(domain.umap.items(), key=lambda kv: kv[1])
    with atomic_open(Path(f"{base}.user2index")) as fh:
        fh.writelines(f"{user_id}\t{u}\n" for user_id, u in user_of)
    if domain.image_features is not None:
        features = np.asarray(domain.image_features, dtype=np.float32).copy()
        if domain.has_image is not None:
            features[~np.asarray(domain.has_image, dtype=bool)] = 0  # MISSRec: zero row = no image
        with atomic_path(Path(f"{base}.feat3CLS")) as tmp:
            features.tofile(tmp)
        counts["image_feature_dim"] = int(features.shape[1])
    counts.update(users=len(users), items=len(item_ids))
    return counts
