"""A randomly initialised BERT backbone directory for a given tokenizer (demo, tests, benchmarks).

Real runs point ``model.backbone`` at a pre-trained checkpoint (e.g. MiniLMv2 L12 H384); CPU
demos, CI and benchmarks need a small backbone without downloading anything, sized to the
project's own tokenizer.  The directory is a normal HF checkpoint (``config.json``,
``model.safetensors``, tokenizer files), so it goes through the same loading path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

__all__ = ["init_random_backbone", "prepare_synthetic_inputs"]


def init_random_backbone(tokenizer_dir: str | os.PathLike, out: str | os.PathLike, *, layers: int = 2,
                         hidden: int = 64, heads: int = 4, intermediate: int | None = None,
                         max_positions: int = 512, seed: int = 0) -> Path:
    """Write a random-weight ``BertForMaskedLM`` whose vocabulary is the tokenizer's (atomically)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate or 4 * hidden,
                        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id or 0)
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def prepare_synthetic_inputs(out: str | os.PathLike, preset: str = "tiny", *, vocab_size: int = 1000,
                             layers: int = 2, hidden: int = 64, heads: int = 4, shard_size: int = 50,
                             seed: int = 0, progress: bool = False) -> dict[str, Path]:
    """Everything a pre-training run needs, from nothing: synthetic domains (`reolm synth`), a
    shard corpus of the pre-training domains (`reolm shard`), a WordPiece tokenizer trained on
    it (`reolm tokenizer train`), its item token table (`reolm tables tokens`) and a random
    backbone with that vocabulary.  Returns the paths (corpus, backbone, tokenizer, domains)."""
    import json

    from reolm.data.shards import ShardOptions, write_corpus
    from reolm.data.synth import generate_corpus, preset_config
    from reolm.data.tables import build_source_token_table, load_tokenizer
    from reolm.data.tokenizer import item_texts, train_tokenizer

    out = Path(out)
    domains_dir = out / "domains"
    generate_corpus(preset_config(preset, images=False), domains_dir, seed=seed, progress=progress)
    info = json.loads((domains_dir / "corpus.json").read_text())
    pretrain = [domains_dir / d["name"] for d in info["domains"] if d.get("role") == "pretrain"]
    corpus = out / "corpus"
    write_corpus(pretrain, corpus, ShardOptions(max_count=shard_size, seed=seed, progress=progress),
                 overwrite=True)
    tokenizer = train_tokenizer(item_texts([corpus]), out / "tokenizer", "wordpiece", vocab_size)
    build_source_token_table(corpus, load_tokenizer(tokenizer), progress=progress)
    backbone = init_random_backbone(tokenizer, out / "backbone", layers=layers, hidden=hidden, heads=heads,
                                    seed=seed)
    return {"corpus": corpus, "backbone": backbone, "tokenizer": tokenizer, "domains": domains_dir}
