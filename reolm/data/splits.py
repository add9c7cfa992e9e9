"""Derived evaluation settings of a processed domain: cold items and few-shot users.

Both write a normal processed domain folder (same items, same item indices, so image
features and token tables stay valid and are carried over) and record where it came from in
``domain.json`` under ``"splits"`` (a list: a split of a split keeps both records).

* **cold items** — a random ``fraction`` of the catalogue never occurs in training: those
  items are removed from every training sequence and remain only as validation / test
  targets, and in test histories where the user's validation item is one of them, as a new
  item would.  A user whose whole training sequence was cold items is dropped (there is
  nothing to condition on).  The chosen item ids are listed in ``cold_items.json``.
* **few-shot** — a random fraction of the users is kept (their train, val and test), the
  others dropped; users are renumbered densely, items are unchanged.

Metrics documents of runs on a split domain carry ``setting`` (``"cold-items"``,
``"few-shot"``, joined by ``+`` for a split of a split; ``"warm"`` otherwise) and the
provenance, so ``reolm report`` keeps the settings apart.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from reolm.data.domain import Domain, DomainError, write_domain
from reolm.io import write_json

__all__ = ["SPLITS_KEY", "COLD_ITEMS_FILE", "cold_item_split", "few_shot_split", "write_split",
           "domain_provenance", "setting_name"]

SPLITS_KEY = "splits"
COLD_ITEMS_FILE = "cold_items.json"


def setting_name(domain: Domain) -> str:
    """``warm`` for an unsplit domain, else the split kinds in order, joined by ``+``."""
    kinds = [str(record.get("kind", "?")) for record in domain.extra.get(SPLITS_KEY, [])]
    return "+".join(kinds) or "warm"


def domain_provenance(domain: Domain) -> dict[str, Any]:
    """``setting`` (and ``domain_splits`` for a split domain) for a metrics document."""
    splits = domain.extra.get(SPLITS_KEY, [])
    return {"setting": setting_name(domain), **({"domain_splits": list(splits)} if splits else {})}


def _check_fraction(value: float, what: str) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{what} must be strictly between 0 and 1, got {value}")


def _keep_users(domain: Domain, train: dict[int, list[int]], keep: list[int]) -> Domain:
    """A copy of ``domain`` with the users ``keep`` (sorted) renumbered 0..len-1 and ``train``."""
    ids = {idx: user_id for user_id, idx in domain.umap.items()}
    new_index = {old: new for new, old in enumerate(keep)}

    def remap(split: dict[int, list[int]]) -> dict[int, list[int]]:
        return {new_index[u]: list(items) for u, items in split.items() if u in new_index}

    return Domain(name=domain.name, train=remap(train), val=remap(domain.val), test=remap(domain.test),
                  smap=dict(domain.smap), umap={ids[old]: new for old, new in new_index.items()}, meta=domain.meta,
                  attributes=list(domain.attributes), image_features=domain.image_features,
                  has_image=domain.has_image, extra=dict(domain.extra))


def _record(domain: Domain, kind: str, seed: int, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "source": str(domain.path) if domain.path else None, "source_name": domain.name,
            "seed": int(seed), **fields, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def cold_item_split(domain: Domain, fraction: float, seed: int) -> tuple[Domain, dict[str, Any], list[str]]:
    """(split domain, provenance record, cold item ids): ``fraction`` of the items made cold."""
    _check_fraction(fraction, "--fraction")
    rng = np.random.default_rng(seed)
    num_cold = max(1, round(fraction * domain.num_items))
    if num_cold >= domain.num_items:
        raise ValueError(f"--fraction {fraction} of {domain.num_items} items leaves no item to train on")
    cold = np.zeros(domain.num_items, dtype=bool)
    cold[rng.choice(domain.num_items, size=num_cold, replace=False)] = True
    train = {u: [i for i in seq if not cold[i]] for u, seq in domain.train.items()}
    removed = sum(len(seq) for seq in domain.train.values()) - sum(len(seq) for seq in train.values())
    keep = sorted(u for u, seq in train.items() if seq)
    if not keep:
        raise ValueError(f"--fraction {fraction}: every training sequence of {domain.name!r} would be empty")
    split = _keep_users(domain, {u: train[u] for u in keep}, keep)

    def cold_targets(held_out: dict[int, list[int]]) -> int:
        return sum(1 for items in held_out.values() if cold[items[0]])

    ids = domain.item_ids()
    record = _record(domain, "cold-items", seed, fraction=float(fraction), cold_items=int(num_cold),
                     cold_items_file=COLD_ITEMS_FILE, removed_train_interactions=int(removed),
                     dropped_users=domain.num_users - len(keep), cold_val_targets=cold_targets(split.val),
                     cold_test_targets=cold_targets(split.test))
    return split, record, [ids[i] for i in np.flatnonzero(cold)]


def few_shot_split(domain: Domain, users: float, seed: int) -> tuple[Domain, dict[str, Any]]:
    """(split domain, provenance record): a random fraction ``users`` of the users kept."""
    _check_fraction(users, "--users")
    rng = np.random.default_rng(seed)
    candidates = sorted(domain.train)
    count = max(1, round(users * len(candidates)))
    keep = sorted(int(u) for u in rng.choice(candidates, size=count, replace=False))
    split = _keep_users(domain, domain.train, keep)
    record = _record(domain, "few-shot", seed, users=float(users), kept_users=len(keep),
                     dropped_users=domain.num_users - len(keep))
    return split, record


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a folder by hard links where the filesystem allows (images can be many GB)."""
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link_or_copy, dirs_exist_ok=True)


def write_split(split: Domain, source: Path, out: str | os.PathLike, record: dict[str, Any],
                cold_item_ids: list[str] | None = None) -> Path:
    """Write the split domain to ``out`` with its provenance; images/ and tables/ carried over."""
    out = Path(out)
    if out.resolve() == source.resolve():
        raise DomainError(f"--out {out} is the source domain folder; write the split elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "domain.json").exists():
        (out / "domain.json").unlink()  # incomplete until write_domain rewrites it last
    for name in ("images", "tables"):
        if (source / name).is_dir():
            _link_tree(source / name, out / name)  # same items and indices: still valid
    if cold_item_ids is not None:
        write_json(out / COLD_ITEMS_FILE, cold_item_ids, indent=None)
    split.extra = {**split.extra, SPLITS_KEY: [*split.extra.get(SPLITS_KEY, []), record]}
    return write_domain(split, out)
