"""The ``reolm`` section of :class:`~reolm.finetune.config.FinetuneConfig` (Reo-LM fine-tuning).

Reo-LM is fine-tuned in two stages (``docs/finetune.md``); each stage has its own
optimisation settings (:class:`ReoLMStageSection`, the shared :class:`~reolm.optim.OptimConfig`
with fine-tuning's defaults).  Of the shared ``train`` section Reo-LM uses only ``seed``,
``device`` and ``progress``: epochs,
learning rates, batch sizes, patience, weight decay and clipping come from
``reolm.stage1`` / ``reolm.stage2``, so one config file can carry the baselines'
``train`` settings and Reo-LM's side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reolm.config import Renamed, param, redefault
from reolm.history import history_items_param
from reolm.model.config import ModelConfig
from reolm.optim import OptimConfig

__all__ = ["ReoLMSection", "ReoLMStageSection", "ReoLMStage2Section"]


@dataclass(frozen=True)
class ReoLMStageSection(OptimConfig):
    """Optimisation (the shared :class:`~reolm.optim.OptimConfig`) and early stopping of one
    fine-tuning stage; the schedule's last step is the stage's last possible one (epochs x steps
    per epoch)."""

    weight_decay: float = redefault(OptimConfig, "weight_decay", 0.0)
    schedule: str = redefault(OptimConfig, "schedule", "constant")
    hold_steps: int = redefault(OptimConfig, "hold_steps", 1)
    epochs: int = param(16, "Maximum epochs over all training prefixes (0 = skip the stage's training).", ge=0)
    batch_size: int = param(16, "Training prefixes (history -> next item) per step.", ge=1)
    evals_per_epoch: int = param(2, "Validations (full ranking of all items) per epoch; 2 = every half "
                                    "epoch.", ge=1)
    patience: int = param(5, "Stop after this many validations without improvement of eval.metric.", ge=1)
    max_steps_per_epoch: int = param(0, "Cap on optimiser steps per epoch (each epoch then trains on a "
                                        "fresh random subset of the prefixes); 0 = the full epoch.", ge=0)
    mlm_weight: float = param(0.1, "Weight of the masked-language-model loss on the history (0 = off: "
                                   "histories are not masked).", ge=0)
    accumulation: int = param(1, "Stage 1: micro-batches of batch_size histories per optimiser step "
                                 "(gradients accumulated; max_steps_per_epoch counts optimiser steps). "
                                 "With reolm.negative_pool = step they share one negative pool.", ge=1)


@dataclass(frozen=True)
class ReoLMStage2Section(ReoLMStageSection):
    """Stage 2: the sequence side against the frozen item table (full softmax over all items)."""

    lr: float = redefault(OptimConfig, "lr", 1e-4)
    mlm_weight: float = redefault(ReoLMStageSection, "mlm_weight", 0.0)


@dataclass(frozen=True)
class ReoLMSection:
    """Reo-LM fine-tuning: stage 1 (sampled softmax with item gradients) then stage 2 (frozen items)."""

    renamed_keys = {"max_history": Renamed("max_history_items"),
                    "eval_max_history": Renamed("eval_max_history_items")}

    init: str = param("", "Pre-trained Reo-LM export (save_pretrained dir) to start from; same as --init.")
    # Used as is with --backbone; with --init only its run-time fields apply (attention,
    # gradient_checkpointing, dropouts when set).  The top half is always gate-routed.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(top_routing="gate"))
    max_history_items: int = history_items_param(
        10, "Training: most recent items of a prefix's history (the reference's 10). See reolm/history.py.")
    eval_max_history_items: int = history_items_param(
        9, "Evaluation and serving: most recent history items when eval.max_history_items is null (the "
           "reference's 9).")
    negatives: int = param(1000, "Stage 1: uniformly sampled negative items per pool (see negative_pool), "
                                 "encoded WITH gradient together with the pool's targets (capped at the "
                                 "number of items; 0 = the targets only).", ge=0)
    negative_pool: str = param("batch", "Stage 1: 'batch' = every micro-batch of stage1.batch_size "
                                        "histories gets its own `negatives` fresh items (the reference: "
                                        "1000 per 16 histories); 'step' = one deduplicated pool of "
                                        "`negatives` items plus every target of the optimiser step, encoded "
                                        "once per step (with gradient) and shared by its stage1.accumulation "
                                        "micro-batches: in-batch targets and negatives cost one encoding "
                                        "per step instead of one per micro-batch.", choices=("batch", "step"))
    item_batch_size: int = param(256, "Items per forward pass when encoding the whole catalogue "
                                      "(validation, the stage-2 item table).", ge=1)
    num_workers: int | None = param(None, "DataLoader worker processes building packed training batches "
                                          "(each round starts them afresh; 0 = in the training process; "
                                          "null = 2 when training on a GPU, so the next step's ~1,000 "
                                          "candidate items are collated while the GPU runs this one, and 0 on "
                                          "CPU, whose cores run the model).", ge=0)
    item_id_embedding: bool = param(False, "Transductive Reo-LM (recorded as reolm-id / reolm-nopretrain-id): an "
                                           "item's vector is its content vector plus a learned ID row, zero at the "
                                           "start and trained in both stages; items never seen in training keep a "
                                           "zero row, so they are scored from content alone (docs/finetune.md).")
    item_id_lr: float = param(1e-3, "AdamW learning rate of the ID rows (item_id_embedding) in both stages: at "
                                    "the encoder's 5e-5 rows starting at zero would stay negligible next to the "
                                    "content vectors for thousands of steps. Warm-up and schedule as the stage's.",
                              gt=0)
    initial_validation: bool = param(False, "Validate once before stage 1 trains (logged as epoch 0; the "
                                            "zero-shot starting point).")
    stage1: ReoLMStageSection = field(default_factory=ReoLMStageSection)
    stage2: ReoLMStage2Section = field(default_factory=ReoLMStage2Section)
