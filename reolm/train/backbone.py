"""Everything a pre-training run needs, built from nothing (tests, benchmarks, demos).

Real runs point ``model.backbone`` at a pre-trained checkpoint (e.g. MiniLMv2 L12 H384) and
``data.corpus`` at shards of real data; CPU tests and benchmarks need both without downloading
anything.  The backbone is a normal HF checkpoint written by :func:`reolm.random_init.init_backbone`,
so it goes through the same loading path.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["prepare_synthetic_inputs"]


def prepare_synthetic_inputs(out: str | os.PathLike, preset: str = "tiny", *, vocab_size: int = 1000,
                             backbone_size: str = "tiny", shard_size: int = 50, seed: int = 0,
                             progress: bool = False) -> dict[str, Path]:
    """Everything a pre-training run needs, from nothing: synthetic domains (`reolm synth`), a
    shard corpus of the pre-training domains (`reolm shard`), a WordPiece tokenizer trained on
    it (`reolm tokenizer train --kind words`,
    exactly reproducible, so runs built on it are too), its item token table (`reolm tables tokens`) and a random
    backbone with that vocabulary (`reolm init backbone --size BACKBONE_SIZE`).  Returns the
    paths (corpus, backbone, tokenizer, domains)."""
    import json

    from reolm.data.shards import ShardOptions, write_corpus
    from reolm.data.synth import generate_corpus, preset_config
    from reolm.data.tables import build_source_token_table, load_tokenizer
    from reolm.data.tokenizer import item_texts, train_tokenizer
    from reolm.random_init import init_backbone

    out = Path(out)
    domains_dir = out / "domains"
    generate_corpus(preset_config(preset, images=False), domains_dir, seed=seed, progress=progress)
    info = json.loads((domains_dir / "corpus.json").read_text())
    pretrain = [domains_dir / d["name"] for d in info["domains"] if d.get("role") == "pretrain"]
    corpus = out / "corpus"
    write_corpus(pretrain, corpus, ShardOptions(max_count=shard_size, seed=seed, progress=progress),
                 overwrite=True)
    tokenizer = train_tokenizer(item_texts([corpus]), out / "tokenizer", "words", vocab_size,
                                progress=progress)
    build_source_token_table(corpus, load_tokenizer(tokenizer), progress=progress)
    backbone = init_backbone(tokenizer, out / "backbone", size=backbone_size, seed=seed)
    return {"corpus": corpus, "backbone": backbone, "tokenizer": tokenizer, "domains": domains_dir}
