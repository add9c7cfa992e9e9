"""Randomly initialised local checkpoints for training from scratch and for the demo.

Nothing may be downloaded at run time, so when no pre-trained checkpoint is at
hand (the demo, CI, a user who wants to pre-train from scratch) these functions
write ordinary Hugging Face checkpoint directories with random weights: a
BERT/RoBERTa masked-LM backbone sized to a local tokenizer, and a small ViT
image encoder with its image processor. Everything downstream loads them
exactly as it would load a real checkpoint. :func:`prepare_synthetic_inputs`
builds everything a pre-training run needs from nothing (tests, benchmarks, demos):
a synthetic corpus, its tokenizer and token table, and a random backbone.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BACKBONE_SIZES", "init_backbone", "init_vision", "prepare_synthetic_inputs"]

# name -> (layers, hidden, heads, intermediate)
BACKBONE_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 64, 2, 128),
    "mini": (4, 128, 4, 512),
    "small": (6, 256, 4, 1024),
    "minilm-l6-h384": (6, 384, 12, 1536),
    "minilm-l12-h384": (12, 384, 12, 1536),
    "base": (12, 768, 12, 3072),
}


def init_backbone(tokenizer_dir: str | os.PathLike, out: str | os.PathLike, size: str = "mini",
                  arch: str = "bert", max_position_embeddings: int = 512, seed: int = 0) -> Path:
    """Write a random-weight ``BertForMaskedLM``/``RobertaForMaskedLM`` checkpoint + tokenizer to ``out``."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    from reolm.data.tables import load_tokenizer

    if size not in BACKBONE_SIZES:
        raise ValueError(f"unknown backbone size {size!r}; choose from {', '.join(BACKBONE_SIZES)}")
    layers, hidden, heads, inter = BACKBONE_SIZES[size]
    tokenizer = load_tokenizer(tokenizer_dir)  # the one loader: local only, read as every stage reads it
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=inter, type_vocab_size=2,
                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if arch == "bert":
        model = BertForMaskedLM(BertConfig(max_position_embeddings=max_position_embeddings, **common))
    elif arch == "roberta":
        # RoBERTa offsets positions by padding_idx + 1, so its table is 2 rows longer.
        model = RobertaForMaskedLM(RobertaConfig(max_position_embeddings=max_position_embeddings + 2,
                                                 bos_token_id=tokenizer.bos_token_id,
                                                 eos_token_id=tokenizer.eos_token_id, **common))
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose bert or roberta")
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def init_vision(out: str | os.PathLike, image_size: int = 32, patch_size: int = 8, hidden: int = 64,
                layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """Write a small random-weight ViT + image processor (an ``AutoModel``/``AutoImageProcessor`` dir)."""
    import torch
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit import ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden)
    out = Path(out)
    ViTModel(config).save_pretrained(out)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out)
    return out


def prepare_synthetic_inputs(out: str | os.PathLike, preset: str = "tiny", *, vocab_size: int = 1000,
                             backbone_size: str = "tiny", shard_size: int = 50, seed: int = 0,
                             progress: bool = False) -> dict[str, Path]:
    """Everything a pre-training run needs, from nothing: synthetic domains (`reolm synth`), a
    shard corpus of the pre-training domains (`reolm shard`), a WordPiece tokenizer trained on
    it (`reolm tokenizer train --kind words`, exactly reproducible, so runs built on it are too),
    its item token table (`reolm tables tokens`) and a random backbone with that vocabulary
    (`reolm init backbone --size BACKBONE_SIZE`).  Returns the paths (corpus, backbone,
    tokenizer, domains)."""
    import json

    from reolm.data.shards import ShardOptions, write_corpus
    from reolm.data.synth import generate_corpus, preset_config
    from reolm.data.corpus import build_source_token_table
    from reolm.data.tables import load_tokenizer
    from reolm.data.tokenizer import item_texts, train_tokenizer

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
