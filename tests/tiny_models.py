"""Tiny random-weight HF checkpoints, tokenizers and item tables for the model tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reolm.data.collate import PackedCollator
from reolm.data.tables import ImageFeatureTable, ItemTokenTable
from reolm.model import ModelConfig, ReoLM

VOCAB = 120
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
IMAGE_DIM = 8


def tiny_hf_config(family: str = "bert", layers: int = 2, hidden: int = 32, heads: int = 4,
                   max_positions: int = 64):
    from transformers import BertConfig, RobertaConfig
    kwargs = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=2 * hidden, max_position_embeddings=max_positions)
    if family == "bert":
        return BertConfig(**kwargs)
    # RoBERTa: padding_idx 1, positions start at 2 (so max_positions - 2 usable rows).
    return RobertaConfig(**kwargs, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)


def tiny_tokenizer():
    from transformers import BertTokenizer
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))])}
    return BertTokenizer(vocab=vocab)


def save_tiny_checkpoint(directory: Path, family: str = "bert", masked_lm: bool = False, seed: int = 0,
                         **config_kwargs):
    """Save a random-weight HF model (+ tokenizer) to ``directory``; returns the HF model (eval mode)."""
    from transformers import BertForMaskedLM, BertModel, RobertaForMaskedLM, RobertaModel
    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, **config_kwargs)
    cls = {("bert", False): BertModel, ("bert", True): BertForMaskedLM,
           ("roberta", False): RobertaModel, ("roberta", True): RobertaForMaskedLM}[(family, masked_lm)]
    model = cls(cfg).eval()
    # Non-trivial LayerNorm/bias values so parity tests would catch a mis-mapped weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    tiny_tokenizer().save_pretrained(str(directory))
    return model


def tiny_model_config(**overrides) -> ModelConfig:
    base = dict(num_adapters=4, adapter_rank=4, image_feature_dim=IMAGE_DIM, max_history_items=6, max_tokens=60,
                hidden_dropout=0.0, attention_dropout=0.0, attention="eager")
    base.update(overrides)
    return ModelConfig(**base)


def tiny_reolm(directory: Path, family: str = "bert", **overrides) -> ReoLM:
    save_tiny_checkpoint(directory, family)
    return ReoLM.from_backbone(directory, tiny_model_config(**overrides)).eval()


def tiny_zero2_engine(directory: Path):
    """(engine, model): a real DeepSpeed ZeRO-2 engine on CPU around ``tiny_reolm(directory)``
    (needs the ``world_of_one`` process group)."""
    import deepspeed

    from reolm.train.config import PretrainOptimConfig
    from reolm.train.ds_config import fill_ds_config, load_ds_config

    model = tiny_reolm(directory)
    ds_cfg = fill_ds_config(load_ds_config(Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json"),
                            PretrainOptimConfig(micro_batch_size=2, steps=10, warmup_steps=0), 1, "cpu")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
    return engine, model


class Held:
    """A checkpoint state that is just a dict (``state``): what a test registers with a CheckpointManager
    to save given values, and reads back after a load (``loaded``)."""

    def __init__(self, state: dict | None = None) -> None:
        self.state = dict(state or {})
        self.loaded: dict | None = None

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state) -> None:
        self.loaded = dict(state)

    def reshard(self, saved):
        return saved[0] if saved else None


def tiny_tables(num_items: int = 20, seed: int = 0, min_len: int = 2, max_len: int = 7,
                image_every: int = 2) -> tuple[ItemTokenTable, ImageFeatureTable]:
    """Random item texts over the 3 default attributes; every ``image_every``-th item has an image."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_items):
        n = int(rng.integers(min_len, max_len + 1))
        types = np.sort(rng.integers(1, 4, n))
        starts = (rng.random(n) < 0.6).astype(int)
        starts[0] = 1
        rows.append((rng.integers(len(SPECIALS), VOCAB, n).tolist(), types.tolist(), starts.tolist()))
    tokens = ItemTokenTable.from_lists(rows, attributes=("category", "title", "brand"))
    features = rng.standard_normal((num_items, IMAGE_DIM)).astype(np.float16)
    has_image = np.arange(num_items) % image_every == 0
    features[~has_image] = 0
    return tokens, ImageFeatureTable(features, has_image)


def tiny_collator(tokens: ItemTokenTable, images: ImageFeatureTable, cfg: ModelConfig | None = None,
                  **overrides) -> PackedCollator:
    cfg = cfg or tiny_model_config()
    return PackedCollator.from_config(tokens, images, tiny_tokenizer(), cfg, **overrides)
