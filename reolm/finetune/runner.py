"""The training runner shared by every model kind.

``run_finetune`` reads the domain, writes the resolved config and hands over to the
trainer registered for ``cfg.model`` (:mod:`reolm.saved.kinds`).  Trainers use the
pieces below so that every model has the same run directory::

    RUN_DIR/config.yaml    resolved FinetuneConfig
    RUN_DIR/log.jsonl      one JSON line per epoch (train loss, validation metrics, time)
    RUN_DIR/best/          self-describing best weights (launch/evaluate.py loads it)
    RUN_DIR/metrics.json   test metrics of the best weights (reolm.eval.contract)

:func:`train_with_early_stopping` is the epoch loop: Adam steps with gradient clipping,
validation every ``eval_every`` epochs by full ranking, best weights kept in memory and
on disk when ``eval.metric`` improves, stop after ``patience`` validations without
improvement, best weights restored at the end.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from reolm.config import save_resolved
from reolm.data.domain import Domain, read_domain
from reolm.data.splits import domain_provenance
from reolm.eval.contract import metrics_document, write_metrics
from reolm.eval.evaluate import EvalResult, Recommender, evaluate_recommender
from reolm.finetune.config import EvalSection, FinetuneConfig, TrainSection
from reolm.precision import resolve_device
from reolm.runtime import FreedMemoryBound
from reolm.saved import get_trainer

__all__ = ["run_finetune", "RunLog", "BestState", "train_with_early_stopping", "evaluate_split",
           "finish_run", "state_on_cpu", "evaluate_saved"]


def state_on_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the state dict (to restore the best weights later)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class RunLog:
    """Append-only JSONL log; each record is flushed at once so a crash loses nothing."""

    def __init__(self, path: str | Path, fresh: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w" if fresh else "a", encoding="utf-8")
        self._start = time.time()

    def write(self, record: dict[str, Any]) -> None:
        record = {"time_s": round(time.time() - self._start, 3), **record}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def evaluate_split(model: Recommender, domain: Domain, split: str, eval_cfg: EvalSection,
                   progress: bool = True) -> EvalResult:
    """Full-ranking metrics with the run's evaluation settings (validation on ``val_max_users``
    users when set)."""
    max_users = eval_cfg.val_max_users if split == "val" and eval_cfg.val_max_users else eval_cfg.max_users
    return evaluate_recommender(model, domain, split, max_history=eval_cfg.max_history_items,
                                batch_size=eval_cfg.batch_size, item_chunk=eval_cfg.item_chunk,
                                ks=tuple(eval_cfg.ks), frequency_buckets=tuple(eval_cfg.frequency_buckets),
                                progress=progress, max_users=max_users, seed=eval_cfg.subset_seed)


@dataclass
class BestState:
    epoch: float = -1
    score: float = -math.inf
    val: dict[str, float] = field(default_factory=dict)
    val_pessimistic: dict[str, float] = field(default_factory=dict)
    epochs_run: float = 0
    stopped_early: bool = False


def train_with_early_stopping(model: nn.Module, optimizer: torch.optim.Optimizer,
                              batches: Callable[[int], Iterable[Any]], loss_fn: Callable[[Any], torch.Tensor] | None,
                              validate: Callable[[], EvalResult], on_improve: Callable[[int, EvalResult], None],
                              train_cfg: TrainSection, metric: str, log: RunLog, stage: str = "train",
                              evals_per_epoch: int = 1, scheduler: Any = None,
                              step_fn: Callable[[Any], torch.Tensor] | None = None) -> BestState:
    """Epoch loop with early stopping on ``metric``; the best weights are loaded back at the end.

    ``batches(epoch)`` yields the epoch's batches; ``loss_fn(batch)`` returns the mean loss;
    ``validate()`` evaluates on the validation split; ``on_improve(epoch, result)`` persists
    the new best (the caller decides what a saved model is).  With ``train.epochs = 0`` the
    untrained model is validated once and kept.

    ``evals_per_epoch = k > 1`` splits every epoch into k rounds: ``batches(r)`` is then called
    with the round number r = 1, 2, ... and yields that fraction of an epoch, ``eval_every``
    and ``patience`` count rounds, and logged epochs are fractional (r / k).  ``scheduler``
    (a torch LR scheduler) is stepped after every optimiser step.  ``step_fn(batch)``, when
    given, replaces ``loss_fn(batch).backward()``: it runs the forward and backward passes of
    one optimiser step itself (e.g. accumulating micro-batches) and returns the detached loss.
    """
    best = BestState()
    best_state: dict[str, torch.Tensor] | None = None
    stale = 0
    host_memory = FreedMemoryBound()

    def consider(epoch: int, extra: dict[str, Any]) -> bool:
        nonlocal best_state, stale
        result = validate()
        score = result.metrics[metric]
        improved = score > best.score
        if improved:
            best.epoch, best.score = epoch, score
            best.val, best.val_pessimistic = result.metrics, result.metrics_pessimistic
            best_state = state_on_cpu(model)
            on_improve(epoch, result)
            stale = 0
        else:
            stale += 1
        log.write({"stage": stage, "epoch": epoch, **extra, "val": result.metrics,
                   "val_pessimistic": result.metrics_pessimistic, "improved": improved})
        return improved

    if train_cfg.epochs == 0:
        consider(0, {})
        return best
    rounds = train_cfg.epochs * evals_per_epoch
    epochs = tqdm(range(1, rounds + 1), desc=stage, unit="epoch" if evals_per_epoch == 1 else "round",
                  disable=not train_cfg.progress)
    for step_round in epochs:
        epoch = step_round if evals_per_epoch == 1 else step_round / evals_per_epoch
        model.train()
        loss_sum: torch.Tensor | None = None
        steps = 0
        for batch in batches(step_round):
            optimizer.zero_grad(set_to_none=True)
            if step_fn is not None:
                loss = step_fn(batch)
            else:
                loss = loss_fn(batch)
                loss.backward()
            if train_cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            host_memory.check()
            loss_sum = add_loss(loss_sum, loss)
            steps += 1
        train_loss = float(loss_sum) / steps if loss_sum is not None else 0.0  # one host copy per round
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"{stage}: training loss became {train_loss} at epoch {epoch}; "
                                     f"lower train.lr or raise train.grad_clip")
        best.epochs_run = epoch
        if step_round % train_cfg.eval_every == 0 or step_round == rounds:
            consider(epoch, {"train_loss": train_loss, "steps": steps})
            epochs.set_postfix(loss=f"{train_loss:.4f}", best=f"{best.score:.4f}@{best.epoch}")
            if stale >= train_cfg.patience:
                best.stopped_early = True
                break
        else:
            log.write({"stage": stage, "epoch": epoch, "train_loss": train_loss, "steps": steps})
    if best_state is not None:
        model.load_state_dict(best_state)
    return best


def add_loss(total: torch.Tensor | None, loss: torch.Tensor) -> torch.Tensor:
    """``total + loss`` in fp64 on the loss's own device: a copy to the host every step would make
    the CPU wait for the GPU after each step instead of queueing the next one."""
    loss = loss.detach().to(torch.float64)
    return loss if total is None else total + loss


def finish_run(run_dir: Path, *, model_name: str, model: Recommender, domain: Domain, cfg: FinetuneConfig,
               best: BestState, log: RunLog, **extra: Any) -> dict[str, Any]:
    """Test the (restored) best weights and write ``RUN_DIR/metrics.json``."""
    test = evaluate_split(model, domain, "test", cfg.eval, progress=cfg.train.progress)
    log.write({"stage": "test", "epoch": best.epoch, "test": test.metrics, "test_pessimistic": test.metrics_pessimistic})
    doc = metrics_document(model=model_name, domain=domain.name, split="test", num_users=test.num_users,
                           num_items=test.num_items, metrics=test.metrics,
                           metrics_pessimistic=test.metrics_pessimistic, best_val=best.val,
                           best_val_pessimistic=best.val_pessimistic, best_epoch=best.epoch,
                           epochs_run=best.epochs_run, stopped_early=best.stopped_early,
                           by_item_frequency=test.by_item_frequency, **domain_provenance(domain), **test.extra,
                           **extra)
    write_metrics(run_dir / "metrics.json", doc)
    return doc


def run_finetune(cfg: FinetuneConfig, domain_dir: str | Path, run_dir: str | Path, *,
                 init: str | Path | None = None, backbone: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on the domain at ``domain_dir`` into ``run_dir``; returns metrics.json."""
    trainer = get_trainer(cfg.model)  # fails fast, before reading data, for unimplemented kinds
    domain = read_domain(domain_dir)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run_dir)
    return trainer(cfg, domain, run_dir, init=init, backbone=backbone)


def evaluate_saved(model_path: str | Path, domain_dir: str | Path, split: str = "test",
                   overrides: Iterable[str] = (), device: str = "auto", progress: bool = True,
                   precision: str = "auto") -> dict[str, Any]:
    """Evaluate a saved model (run dir or best/), a Reo-LM export or a plain HF checkpoint (both
    zero-shot) on ``split``; returns a metrics document.

    The evaluation settings are those the run used (``best/config.yaml``), then ``overrides``
    (``eval.*`` keys; for an HF checkpoint also ``reolm.model.*``), so the test metrics of a
    run are reproduced exactly by default.  ``precision`` (:mod:`reolm.precision`) applies to
    Reo-LM and the zero-shot PLM; the document records the one used.
    """
    from reolm.config import apply_overrides, load_saved_config
    from reolm.saved import DESCRIPTOR, resolve

    saved = resolve(model_path)  # a run dir, its best/, an export or an HF checkpoint
    saved_cfg = saved.folder / "config.yaml"
    if saved_cfg.is_file() and (saved.folder / DESCRIPTOR).is_file():
        cfg = load_saved_config(FinetuneConfig, saved_cfg, overrides)  # a run of an older version, too
    else:
        cfg = apply_overrides(FinetuneConfig(), overrides)
    domain = read_domain(domain_dir)
    model = saved.load(cfg, domain).to(resolve_device(device))
    numerics = {}
    if saved.kind.content:  # the text models; the ID baselines always score in fp32
        model.progress = progress  # item encoding's progress bar
        numerics = {"precision": model.set_precision(precision).precision}
    saved.check_domain(domain, str(saved.folder))
    model.bind(domain)  # a content model encodes the evaluated domain's item text and images
    result = evaluate_split(model, domain, split, cfg.eval, progress=progress)
    return metrics_document(model=saved.name, domain=domain.name, split=split, num_users=result.num_users,
                            num_items=result.num_items, metrics=result.metrics,
                            metrics_pessimistic=result.metrics_pessimistic, model_dir=str(saved.folder),
                            by_item_frequency=result.by_item_frequency, **numerics, **domain_provenance(domain),
                            **result.extra)
