"""Shared fixtures: tiny data built on the fly, never downloaded."""

from __future__ import annotations

import random

import pytest

from reolm.data.domain import Domain


def make_domain(name: str = "tiny", num_users: int = 30, num_items: int = 40, seed: int = 0,
                min_len: int = 4, max_len: int = 9) -> Domain:
    """A small valid domain: each user's sequence walks through item 'topics' in order."""
    rng = random.Random(seed)
    smap = {f"{name}-i{i}": i for i in range(num_items)}
    umap = {f"{name}-u{u}": u for u in range(num_users)}
    meta = {item_id: {"category": f"cat{idx % 5}", "title": f"item {idx} of topic {idx % 5}",
                      "brand": "" if idx % 7 == 0 else f"brand{idx % 3}"}
            for item_id, idx in smap.items()}
    train, val, test = {}, {}, {}
    for u in range(num_users):
        length = rng.randint(min_len, max_len)
        start = rng.randrange(num_items)
        seq = [(start + 5 * k + rng.randint(0, 1)) % num_items for k in range(length)]
        train[u], val[u], test[u] = seq[:-2], [seq[-2]], [seq[-1]]
    return Domain(name=name, train=train, val=val, test=test, smap=smap, umap=umap, meta=meta)


@pytest.fixture
def tiny_domain() -> Domain:
    return make_domain()


# The local 2-node Slurm cluster (session scope) for the tests marked `slurm`.
from slurm_cluster import slurm_cluster  # noqa: E402,F401
