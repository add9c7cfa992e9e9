"""FinetuneConfig: the one typed config of ``launch/finetune.py`` (every model kind).

Sections: ``train`` (optimisation, the shared :class:`~reolm.optim.OptimConfig` with the baselines'
defaults, and early stopping), ``eval`` (full ranking),
and one section per model kind (``sasrec``, ``gru4rec``, ``bert4rec``; the Reo-LM
trainer adds its own).  Only the section of the chosen ``model`` is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reolm.baselines.config import BERT4RecConfig, GRU4RecConfig, SASRecConfig
from reolm.config import ConfigError, Renamed, param, redefault
from reolm.eval.frequency import DEFAULT_FREQUENCY_BUCKETS, FrequencyBuckets
from reolm.eval.metrics import DEFAULT_KS, metric_names
from reolm.finetune.reolm_config import ReoLMSection
from reolm.history import history_items_param
from reolm.optim import OptimConfig

from reolm.precision import PRECISION_DOC, PRECISIONS

__all__ = ["FinetuneConfig", "TrainSection", "EvalSection", "MODEL_CHOICES"]

MODEL_CHOICES = ("reolm", "sasrec", "gru4rec", "bert4rec", "pop")


@dataclass(frozen=True)
class TrainSection(OptimConfig):
    """Optimisation (the shared :class:`~reolm.optim.OptimConfig`; AdamW, no warm-up) and early stopping."""

    lr: float = redefault(OptimConfig, "lr", 1e-3)
    weight_decay: float = redefault(OptimConfig, "weight_decay", 0.0)
    grad_clip: float = redefault(OptimConfig, "grad_clip", 5.0)
    schedule: str = redefault(OptimConfig, "schedule", "constant")
    warmup_steps: int = redefault(OptimConfig, "warmup_steps", 0)
    hold_steps: int = redefault(OptimConfig, "hold_steps", 1)
    epochs: int = param(200, "Maximum number of epochs over the training users.", ge=0)
    batch_size: int = param(256, "Training sequences per step.", ge=1)
    patience: int = param(10, "Stop after this many validations without improvement of eval.metric.", ge=1)
    eval_every: int = param(1, "Validate every this many epochs.", ge=1)
    seed: int = param(42, "Seed of parameter init, shuffling, masking and negative sampling.")
    device: str = param("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N.")
    precision: str = param("auto", PRECISION_DOC + " Applies to Reo-LM (training, validation and test) and to the "
                                                   "content model of sasrec.item_init; the ID baselines always "
                                                   "train in fp32.", choices=PRECISIONS)
    progress: bool = param(True, "Show tqdm progress bars.")

    def check(self) -> None:
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device: {self.device!r} is not auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class EvalSection:
    """Full-ranking evaluation (leave-one-out, all items of the domain)."""

    renamed_keys = {"max_history": Renamed("max_history_items")}

    max_history_items: int | None = history_items_param(
        None, "Most recent history items given to every model at evaluation; null = the model's own "
              "(reolm.eval_max_history_items, a baseline's max_history_items). See reolm/history.py.")
    batch_size: int = param(512, "Users per evaluation batch.", ge=1)
    item_chunk: int = param(65536, "Items scored at a time (bounds memory: batch_size x item_chunk scores).", ge=1)
    ks: list[int] = param(list(DEFAULT_KS), "Cut-offs K of NDCG@K and Recall@K.", ge=1)
    metric: str = param("NDCG@10", "Validation metric for early stopping and best-weight selection.")
    max_users: int = param(0, "Evaluate a random subset of this many users of the split (the same users "
                              "for every model, given subset_seed); 0 = all. Recorded in metrics.json.", ge=0)
    subset_seed: int = param(0, "Seed of the max_users subset.")
    val_max_users: int = param(0, "Validation only (early stopping and best-weight selection): a random subset of "
                                  "this many users (seed subset_seed); 0 = as max_users. Encoding every user's "
                                  "history is most of a text model's validation, so this bounds its cost; the "
                                  "test split always follows max_users.", ge=0)
    frequency_buckets: list[int] = param(list(DEFAULT_FREQUENCY_BUCKETS),
                                         "Lower bounds of the by_item_frequency buckets: users grouped by how "
                                         "often their target occurs in train.json (default 0, 1-4, 5-19, 20+).",
                                         ge=0)

    def check(self) -> None:
        try:
            FrequencyBuckets(tuple(self.frequency_buckets))
        except ValueError as err:
            raise ConfigError(f"frequency_buckets: {err}") from None
        if self.metric not in metric_names(self.ks):
            raise ConfigError(f"metric: {self.metric!r} is not one of {metric_names(self.ks)}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tune / train one model on one processed domain and evaluate it by full ranking."""

    model: str = param("sasrec", "Model kind to train.", choices=MODEL_CHOICES)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    gru4rec: GRU4RecConfig = field(default_factory=GRU4RecConfig)
    bert4rec: BERT4RecConfig = field(default_factory=BERT4RecConfig)
    reolm: ReoLMSection = field(default_factory=ReoLMSection)
