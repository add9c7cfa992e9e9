"""The model's config section (declared with the project's one typed config system)."""

from __future__ import annotations

from dataclasses import dataclass

from reolm.config import ConfigError, Renamed, param
from reolm.history import history_items_param

__all__ = ["ModelConfig", "ATTENTION_BACKENDS"]

ATTENTION_BACKENDS = ("auto", "eager", "math", "sdpa", "varlen", "flash")
TOP_ROUTINGS = ("domain", "gate", "mean")


@dataclass(frozen=True)
class ModelConfig:
    """Reo-LM encoder: backbone, adapters, image tokens, attention backend, pooling, batch budget."""

    renamed_keys = {"max_items": Renamed("max_history_items")}

    backbone: str = param("", "Local Hugging Face checkpoint directory (config.json + model.safetensors "
                              "or pytorch_model.bin + tokenizer files) of a BERT/RoBERTa-architecture "
                              "model, e.g. MiniLMv2 L12 H384. Never downloaded.")
    num_attributes: int = param(3, "K, the number of item attributes: token types are 0=CLS, 1..K "
                                   "attributes, K+1 image, K+2 padding.", ge=1)
    num_adapters: int = param(8, "A, adapters per layer (also the most domains routable in pre-training).",
                              ge=1)
    adapter_rank: int = param(128, "r, the bottleneck width of each adapter.", ge=1)
    adapter_scale: float = param(2.0, "Multiplier on the adapter output added to the FFN output.")
    adapter_activation: str = param("gelu", "Activation between the shared down-projection and the "
                                            "up-projections.", choices=("gelu", "relu", "tanh", "silu"))
    top_routing: str = param("domain", "Routing of the top half of the layers: 'domain' = the adapter of "
                                       "the sequence's domain (pre-training), 'gate' = learned per-token "
                                       "softmax gate (fine-tuning), 'mean' = average of all adapters "
                                       "(zero-shot on an unseen domain). The bottom half always averages.",
                             choices=TOP_ROUTINGS)
    attention: str = param("auto", "Attention backend: auto = flash if importable on CUDA, else varlen "
                                   "on CUDA (sdpa when training with attention dropout), else sdpa, and "
                                   "on CPU math when training; eager is the fp32 reference math.",
                           choices=ATTENTION_BACKENDS)
    attention_bucket_ratio: float = param(0.5, "eager/math/sdpa only: sequences are grouped by length for "
                                               "attention, a new group starting below this share of the "
                                               "group's longest; 0 = one group padded to the longest.",
                                          ge=0, le=1)
    pooling: str = param("cls", "Sequence/item vector: the [CLS] output or the mean of all tokens.",
                         choices=("cls", "mean"))
    cls_only_last_layer: bool = param(True, "With cls pooling, encoding for a pooled vector (items, "
                                            "histories, the training losses) runs the last layer on the "
                                            "[CLS] rows only: keys and values from every token, the rest "
                                            "for one row per sequence. Same vectors up to float rounding.")
    temperature: float = param(0.05, "Scores are cosine similarity divided by this.", gt=0)
    max_history_items: int = history_items_param(
        50, "Most history items per sequence (the most recent kept; also cut by max_tokens). The "
            "item-position table has max_history_items + 1 rows, so an export fixes it. See reolm/history.py.")
    max_tokens: int = param(1024, "Most tokens per sequence including [CLS] and image tokens.", ge=3)
    max_attr_tokens: int = param(32, "Tokens per attribute (key + value) in the item token table.", ge=1)
    mlm_probability: float = param(0.15, "Share of words masked for the MLM loss (whole-word masking).",
                                   ge=0, le=1)
    image_feature_dim: int = param(512, "Width d of the precomputed image features (must match the "
                                        "image feature table).", ge=1)
    max_position_embeddings: int = param(0, "Rows of the position table; 0 = enough for max_tokens. Rows "
                                            "beyond the checkpoint's are copies of its learned rows.", ge=0)
    hidden_dropout: float | None = param(None, "Dropout on embeddings and sub-layer outputs; null = the "
                                               "checkpoint's hidden_dropout_prob.", ge=0, lt=1)
    attention_dropout: float | None = param(None, "Dropout on attention probabilities; null = the "
                                                  "checkpoint's value. Ignored by the varlen backend.",
                                            ge=0, lt=1)
    gradient_checkpointing: bool | None = param(None, "Recompute each layer in the backward pass (activation "
                                                      "checkpointing) to save memory; null = automatic: on "
                                                      "when fine-tuning on CPU (a default stage-1 step of a "
                                                      "384-wide backbone needs ~18 GB without it), off "
                                                      "otherwise (pre-training, GPUs).")

    def check(self) -> None:
        if self.max_position_embeddings and self.max_position_embeddings < self.max_tokens:
            raise ConfigError(f"max_position_embeddings ({self.max_position_embeddings}) must be >= "
                              f"max_tokens ({self.max_tokens}) or 0 for automatic")

    @property
    def num_token_types(self) -> int:
        """CLS + K attributes + image + padding."""
        return self.num_attributes + 3

    @property
    def image_type_id(self) -> int:
        return self.num_attributes + 1

    @property
    def pad_type_id(self) -> int:
        return self.num_attributes + 2
