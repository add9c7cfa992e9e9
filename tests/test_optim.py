"""The one learning-rate schedule (reolm.optim) reproduces the two it replaced, step for step.

The expected numbers were printed by the former implementations (pre-training's
``reolm.train.ds_config.lr_factor`` and fine-tuning's ``reolm_trainer.warmup_schedule``) before
they were merged, so a change of either curve fails here."""

from __future__ import annotations

import pytest
import torch

from reolm.finetune.config import TrainSection
from reolm.finetune.reolm_config import ReoLMStage2Section, ReoLMStageSection
from reolm.optim import OptimConfig, adamw, lr_factor, lr_schedule
from reolm.train.config import PretrainOptimConfig
from reolm.train.ds_config import lr_scheduler_factory

PRETRAIN_STEPS = (0, 4, 9, 10, 30, 49)
PRETRAIN = {  # warmup 10 of 50 steps, min_lr_ratio 0.1
    "linear": [0.1, 0.5, 1.0, 0.9780487804878049, 0.5390243902439025, 0.12195121951219515],
    "cosine": [0.1, 0.5, 1.0, 0.9986796105326832, 0.5327637698394841, 0.10132038946731681],
    "constant": [0.1, 0.5, 1.0, 1.0, 1.0, 1.0],
}
FINETUNE = {  # 12 steps, (schedule, warmup) -> lr of every step at peak lr 1
    ("linear", 0): [1.0, 0.9166666666666666, 0.8333333333333334, 0.75, 0.6666666666666667, 0.5833333333333333,
                    0.5, 0.41666666666666663, 0.33333333333333337, 0.25, 0.16666666666666663,
                    0.08333333333333337],
    ("linear", 4): [0.25, 0.5, 0.75, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125],
    ("constant", 4): [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
}


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    optimizer = scheduler.optimizer
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("schedule", sorted(PRETRAIN))
def test_pretraining_schedule_is_the_former_one(schedule):
    optim = PretrainOptimConfig(lr=1e-3, warmup_steps=10, steps=50, schedule=schedule, min_lr_ratio=0.1)
    assert [lr_factor(optim, i, optim.steps) for i in PRETRAIN_STEPS] == PRETRAIN[schedule]
    lrs = _lrs(lr_scheduler_factory(optim)(_optimizer(optim.lr)), optim.steps)  # what DeepSpeed is handed
    assert [lrs[i] for i in PRETRAIN_STEPS] == pytest.approx([1e-3 * f for f in PRETRAIN[schedule]], rel=1e-12)


def test_pretraining_without_warmup_decays_from_the_first_step():
    optim = PretrainOptimConfig(steps=10, warmup_steps=0, schedule="linear")
    assert [lr_factor(optim, i, 10) for i in (0, 1, 9)] == [0.9090909090909091, 0.8181818181818181,
                                                           0.09090909090909094]


@pytest.mark.parametrize("schedule,warmup", sorted(FINETUNE))
def test_finetuning_schedule_is_the_former_one(schedule, warmup):
    stage = ReoLMStageSection(lr=1.0, warmup_steps=warmup, schedule=schedule)
    assert stage.hold_steps == 1  # fine-tuning keeps the peak one step longer than pre-training
    assert _lrs(lr_schedule(_optimizer(stage.lr), stage, 12), 12) == FINETUNE[(schedule, warmup)]


def test_baselines_keep_a_constant_learning_rate():
    train = TrainSection(lr=3e-3)
    optimizer = adamw([torch.nn.Parameter(torch.zeros(1))], train)
    assert _lrs(lr_schedule(optimizer, train, 7), 7) == [3e-3] * 7
    group = optimizer.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.0)  # torch's defaults


def test_every_trainer_extends_the_one_optimisation_section():
    for section in (PretrainOptimConfig, TrainSection, ReoLMStageSection, ReoLMStage2Section):
        assert issubclass(section, OptimConfig)
    assert (ReoLMStage2Section().lr, ReoLMStageSection().lr, TrainSection().lr, PretrainOptimConfig().lr) == \
        (1e-4, 5e-5, 1e-3, 5e-5)
