"""Shared fixtures: tiny data built on the fly, never downloaded."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from launch_helpers import free_port

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


def tiny_downstream_domain(root: Path) -> Path:
    """The ``tiny`` synthetic preset's downstream domain (Scientific, no images) under ``root/data``."""
    from reolm.data.synth import generate_corpus, preset_config

    cfg = preset_config("tiny", images=False)
    cfg = dataclasses.replace(cfg, domains=tuple(d for d in cfg.domains if d.role == "downstream"))
    (domain_dir,) = generate_corpus(cfg, root / "data", seed=0, progress=False)
    return domain_dir


@pytest.fixture
def tiny_domain() -> Domain:
    return make_domain()


@pytest.fixture(scope="module")
def world_of_one():
    """A real (gloo) process group of one rank for DeepSpeed engines in this process.

    It stays up for the rest of the session: DeepSpeed caches its groups, so a destroyed and
    re-created group would break the next engine.
    """
    from reolm.train import distributed as D
    with pytest.MonkeyPatch.context() as mp_env:
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
            mp_env.setenv(key, value)
        D.init()
        yield


@pytest.fixture(scope="session")
def pretrain_inputs(tmp_path_factory):
    """Synthetic corpus, tokenizer, token table and random tiny backbone for pre-training runs (built once)."""
    from reolm.random_init import prepare_synthetic_inputs
    return prepare_synthetic_inputs(tmp_path_factory.mktemp("pretrain_inputs"), "tiny", vocab_size=300,
                                    backbone_size="tiny")


# The local 2-node Slurm cluster (session scope) for the tests marked `slurm`.
from slurm_cluster import slurm_cluster  # noqa: E402,F401
