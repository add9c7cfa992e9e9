"""Shared pieces of the model benchmarks: machine description, synthetic checkpoints and batches.

The batches follow the shape of real recommendation data: the number of history items per
sequence is log-uniform in [1, 50] (most users have short histories, a few very long ones) and
each item has 20-100 text tokens; the collator then applies the 50-item / max_tokens budget.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reolm.data.collate import PackedCollator, SequenceExample, TrainingBatch
from reolm.data.tables import ImageFeatureTable, ItemTokenTable
from reolm.io import write_text
from reolm.model.objectives import info_nce

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: str = "cpu") -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def save_random_roberta(directory: Path, layers: int, hidden: int, heads: int, vocab: int = 50265,
                        max_positions: int = 1026, seed: int = 0) -> Path:
    """A random-weight RoBERTa-architecture checkpoint (+ a word-level tokenizer) for timing only."""
    from transformers import BertTokenizer, RobertaConfig, RobertaModel
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=max_positions, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    RobertaModel(cfg, add_pooling_layer=False).save_pretrained(str(directory))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    BertTokenizer(vocab={t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab - 5)])}
                  ).save_pretrained(str(directory))
    return directory


def synthetic_tables(num_items: int, vocab: int, image_dim: int, seed: int = 0
                     ) -> tuple[ItemTokenTable, ImageFeatureTable]:
    """Items of 20-100 tokens over 3 attributes; 71% have an image (the paper's share)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 101, num_items)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    types = np.concatenate([np.sort(rng.integers(1, 4, n)) for n in lengths]).astype(np.int8)
    starts = (rng.random(total) < 0.7).astype(np.uint8)
    starts[offsets[:-1]] = 1
    tokens = ItemTokenTable(rng.integers(5, vocab, total).astype(np.int32), types, starts, offsets,
                            ("category", "title", "brand"))
    has_image = rng.random(num_items) < 0.71
    features = (rng.standard_normal((num_items, image_dim)) * has_image[:, None]).astype(np.float16)
    return tokens, ImageFeatureTable(features, has_image)


def synthetic_examples(batch_size: int, num_items: int, num_domains: int, seed: int = 0
                       ) -> list[SequenceExample]:
    rng = np.random.default_rng(seed)
    counts = np.exp(rng.uniform(np.log(1), np.log(51), batch_size)).astype(int).clip(1, 50)
    return [SequenceExample(rng.integers(0, num_items, n), int(rng.integers(0, num_items)),
                            int(rng.integers(0, num_domains))) for n in counts]


def collator(tokens: ItemTokenTable, images: ImageFeatureTable, tokenizer: Any, cfg: Any, layout: str
             ) -> PackedCollator:
    return PackedCollator.from_config(tokens, images, tokenizer, cfg, layout=layout, seed=0)


def result_path(out: str | os.PathLike[str]) -> Path:
    """Where a benchmark's JSON goes: a bare file name under bench/results/, a path with a folder
    (``DIR/x.json``, absolute or relative to the working directory) exactly there."""
    path = Path(out)
    return path if path.parent != Path(".") else RESULTS / path


def write_result(out: str | os.PathLike[str], result: dict[str, Any]) -> Path:
    """Write ``result`` as JSON to :func:`result_path` of ``out`` (its folder created); returns the path."""
    path = result_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(result, indent=2) + "\n")


class PartialResult:
    """A benchmark's JSON, rewritten after every configuration it measures, so a run stopped by
    a time limit or a crash keeps what it had measured; ``complete`` turns true at the end."""

    def __init__(self, out: str | os.PathLike[str], **fields: Any) -> None:
        self.out, self.doc = out, {**fields, "complete": False}

    def update(self, **fields: Any) -> Path:
        self.doc.update(fields)
        return write_result(self.out, self.doc)

    def finish(self, **fields: Any) -> Path:
        return self.update(**fields, complete=True)


def training_loss(model: Any, batch: TrainingBatch) -> torch.Tensor:
    """The pre-training objective on one batch: InfoNCE over the batch's targets + 0.1 x MLM, with
    the forwards pre-training runs (``reolm.train.step.forward_losses``: both ``pooled_only``)."""
    out = model(batch.history, pooled_only=True)
    items = model.encode(batch.target)
    return info_nce(out.pooled, items, model.config.temperature).loss + 0.1 * model.mlm_loss(out, batch.history)
