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

__all__ = ["init_random_backbone"]


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
