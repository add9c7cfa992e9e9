"""Trainer of the ID-based baselines (pop, SASRec, GRU4Rec, BERT4Rec) for the shared runner."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator

import torch

from reolm.baselines.base import ITEM_INIT_STD, pad_right
from reolm.baselines.registry import TEXT_INIT_SASREC, build_baseline, section_dict
from reolm.config import save_resolved
from reolm.data.domain import Domain
from reolm.eval.evaluate import EvalResult
from reolm.eval.frequency import item_train_counts
from reolm.finetune.config import FinetuneConfig
from reolm.finetune.runner import RunLog, evaluate_split, finish_run, train_with_early_stopping
from reolm.optim import adamw, lr_schedule
from reolm.precision import resolve_device
from reolm.saved import save_recommender
from reolm.seeding import seed_everything

__all__ = ["train_baseline"]


def _training_sequences(domain: Domain, window: int, min_len: int) -> list[list[int]]:
    """Each user's most recent ``window`` training items (users with fewer than min_len skipped)."""
    return [seq[-window:] for _, seq in sorted(domain.train.items()) if len(seq) >= min_len]


def _epoch_batches(sequences: list[list[int]], batch_size: int, pad_index: int, device: torch.device,
                   generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(sequences), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        yield pad_right([sequences[i] for i in order[start:start + batch_size]], pad_index, device=device)


def _text_init(model: torch.nn.Module, cfg: FinetuneConfig, domain: Domain) -> str:
    """Copy the text-derived item rows into SASRec when ``sasrec.item_init`` names a content model;
    returns the name the run is recorded under."""
    source = getattr(getattr(cfg, cfg.model, None), "item_init", "")
    if not source:
        return cfg.model
    from reolm.finetune.item_init import text_item_rows

    device = model.item_embedding.weight.device
    # Loading the content model draws random init values; on a forked RNG, the run's shuffling and
    # dropout are those of plain SASRec with the same seed, so only the starting rows differ.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        rows = text_item_rows(source, domain, cfg, model.item_embedding.embedding_dim, ITEM_INIT_STD)
    model.set_item_rows(rows)
    return TEXT_INIT_SASREC


def _param_groups(model: torch.nn.Module, model_name: str) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: all in one, except that a text-initialised item table
    gets no weight decay.  AdamW's decoupled decay shrinks every row of a parameter, trained or
    not, which would pull the rows of items never seen in training away from their text-derived
    values; without it those rows stay exactly as initialised, since their gradient is exactly 0
    (they occur in no training sequence and the losses only use trained items) and Adam moves a
    parameter whose gradient and moments are 0 by exactly 0."""
    if model_name != TEXT_INIT_SASREC:
        return [{"params": list(model.parameters())}]
    table = model.item_embedding.weight
    return [{"params": [p for p in model.parameters() if p is not table]},
            {"params": [table], "weight_decay": 0.0}]


def train_baseline(cfg: FinetuneConfig, domain: Domain, run_dir: Path, *, init: Any = None,
                   backbone: Any = None) -> dict[str, Any]:
    if init is not None or backbone is not None:
        raise ValueError(f"--init/--backbone apply to Reo-LM only, not to model {cfg.model!r}")
    generator = seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    section = getattr(cfg, cfg.model, None)
    model = build_baseline(cfg.model, domain.num_items, section).to(device)
    if hasattr(model, "set_training_items"):  # rows of items unseen in training stay untrained
        model.set_training_items(item_train_counts(domain) > 0)
    model_name = _text_init(model, cfg, domain)
    train_cfg = cfg.train
    if cfg.model == "pop":
        model.fit(domain.train.values())
        train_cfg = dataclasses.replace(train_cfg, epochs=0)  # nothing to optimise
    best_dir = run_dir / "best"

    def on_improve(epoch: int, result: EvalResult) -> None:
        save_recommender(best_dir, model, model_name=model_name, num_items=domain.num_items, domain=domain.name,
                         model_config=section_dict(section), extra={"epoch": epoch, "val": result.metrics})
        save_resolved(cfg, best_dir)

    min_len = 1 if cfg.model == "bert4rec" else 2  # next-item models need an input and a target
    sequences = _training_sequences(domain, getattr(model, "train_window", 1), min_len)
    sequences = sequences * getattr(model, "copies_per_epoch", 1)
    if train_cfg.epochs > 0 and not sequences:
        raise ValueError(f"domain {domain.name!r} has no training sequence of length >= {min_len}")
    params = list(model.parameters())
    optimizer = adamw(_param_groups(model, model_name), cfg.train) if params else None
    steps = train_cfg.epochs * math.ceil(len(sequences) / cfg.train.batch_size)
    scheduler = lr_schedule(optimizer, cfg.train, steps) if optimizer is not None else None
    pad_index = getattr(model, "pad_index", domain.num_items)
    with RunLog(run_dir / "log.jsonl") as log:
        log.write({"stage": "setup", "model": model_name, "domain": domain.name, "num_items": domain.num_items,
                   "num_train_sequences": len(sequences), "device": str(device),
                   "parameters": sum(p.numel() for p in params)})
        best = train_with_early_stopping(
            model, optimizer,
            batches=lambda epoch: _epoch_batches(sequences, cfg.train.batch_size, pad_index, device, generator),
            loss_fn=lambda batch: model.training_loss(*batch),
            validate=lambda: evaluate_split(model, domain, "val", cfg.eval, progress=cfg.train.progress),
            on_improve=on_improve, train_cfg=train_cfg, metric=cfg.eval.metric, log=log, stage=model_name,
            scheduler=scheduler)
        return finish_run(run_dir, model_name=model_name, model=model, domain=domain, cfg=cfg, best=best, log=log)
