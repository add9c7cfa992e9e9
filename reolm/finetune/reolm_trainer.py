"""Reo-LM fine-tuning on one domain: stage 1, stage 2, test (``docs/finetune.md``).

* **Stage 1** — every prefix of a user's training sequence predicts its next item (history =
  the last ``reolm.max_history_items`` items).  Each step encodes the batch's histories (MLM-masked
  when ``mlm_weight > 0``) and, *with gradient*, the batch's targets plus ``reolm.negatives``
  uniformly sampled items; loss = cross-entropy of cosine/temperature scores over that
  candidate set + ``mlm_weight`` x MLM.  Validation ranks all items, encoded once per
  validation with the current weights.
* **Stage 2** — the best stage-1 weights encode every item once into a frozen table; the
  sequence side trains with a full softmax over that table; validation and test use it.
  The final model is stage 2's best, unless stage 2 never beat stage 1's best validation
  score (then stage 1's weights, with the same table, are kept).
* **Transductive variant** (``reolm.item_id_embedding``) — every candidate vector (stage-1 pools,
  the stage-2 table, validation and test) is the content vector plus the item's learned ID row,
  zero at the start; the rows train in both stages at ``reolm.item_id_lr``.

Both stages run in the runner's epoch loop (:func:`~reolm.finetune.runner.train_with_early_stopping`:
AdamW steps, clipping, early stopping on ``eval.metric``, best weights restored), one
JSONL log and the same ``RUN_DIR`` layout as the baselines.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from reolm.config import save_resolved
from reolm.data.batch import PackedBatch
from reolm.data.collate import PackedCollator, SequenceExample
from reolm.data.domain import Domain
from reolm.data.tables import load_tokenizer
from reolm.eval.evaluate import EvalResult
from reolm.eval.frequency import item_train_counts
from reolm.finetune.config import FinetuneConfig
from reolm.finetune.reolm_config import ReoLMSection, ReoLMStageSection
from reolm.finetune.reolm_recommender import ID_SUFFIX, ReoLMRecommender, save_reolm_folder, sized_for_domain
from reolm.finetune.runner import (BestState, RunLog, evaluate_split, finish_run, state_on_cpu,
                                   train_with_early_stopping)
from reolm.model import ReoLM
from reolm.model.objectives import info_nce
from reolm.optim import adamw, lr_schedule, optim_settings
from reolm.precision import resolve_device
from reolm.saved import BACKBONE_ORIGIN, export_origin
from reolm.seeding import seed_everything

__all__ = ["train_reolm", "build_finetune_model", "with_weights_source", "PrefixDataset", "PrefixCollate",
           "MicroBatch", "StepBatch", "stage_rounds", "train_step", "TrainCost", "parameter_groups"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- model

def _weights_source(section: ReoLMSection, init: str | Path | None, backbone: str | Path | None) -> tuple[str, str]:
    """(init, backbone) after the flags and the config: exactly one of them is set."""
    init = str(init or section.init or "")
    backbone = str(backbone or ("" if init else section.model.backbone) or "")
    if init and backbone:
        raise ValueError("give either --init EXPORT_DIR (a pre-trained Reo-LM) or --backbone HF_DIR "
                         "(no pre-training), not both")
    if not init and not backbone:
        raise ValueError("Reo-LM fine-tuning needs --init EXPORT_DIR (pre-trained export) or --backbone HF_DIR "
                         "(an HF BERT/RoBERTa checkpoint, no pre-training)")
    return init, backbone


def build_finetune_model(cfg: FinetuneConfig, domain: Domain, init: str | Path | None,
                         backbone: str | Path | None) -> tuple[ReoLM, str]:
    """(model in fine-tuning mode, metrics model name) from a pre-trained export or an HF backbone."""
    init, backbone = _weights_source(cfg.reolm, init, backbone)
    m = cfg.reolm.model
    if init:
        overrides: dict[str, Any] = {"top_routing": "gate", "attention": m.attention,
                                     "gradient_checkpointing": m.gradient_checkpointing}
        overrides.update({k: getattr(m, k) for k in ("hidden_dropout", "attention_dropout")
                          if getattr(m, k) is not None})
        model = ReoLM.from_pretrained(init, overrides=overrides)
        # An export of a plain checkpoint (`reolm export backbone`) carries no pre-training.
        name = "reolm-nopretrain" if export_origin(init) == BACKBONE_ORIGIN else "reolm"
    else:
        model = ReoLM.from_backbone(backbone, sized_for_domain(dataclasses.replace(m, top_routing="gate"),
                                                                domain))
        name = "reolm-nopretrain"
    model.set_routing("gate")
    return model, name + (ID_SUFFIX if cfg.reolm.item_id_embedding else "")


def with_weights_source(cfg: FinetuneConfig, model: ReoLM, init: str | Path | None,
                        backbone: str | Path | None) -> FinetuneConfig:
    """``cfg`` recording where the weights came from (``reolm.init``, and the model's settings with
    its backbone), for the run's resolved config; ``cfg`` itself is left as loaded."""
    init, backbone = _weights_source(cfg.reolm, init, backbone)
    section = cfg.reolm
    model_cfg = dataclasses.replace(model.config, backbone=backbone or section.model.backbone)
    return dataclasses.replace(cfg, reolm=dataclasses.replace(section, init=init, model=model_cfg))


def checkpointing_for(setting: bool | None, device: torch.device) -> bool:
    """``reolm.model.gradient_checkpointing``, with null resolved: on for CPU training, where a
    stage-1 step (histories + 1,000 negatives, all with gradient) of a 384-wide backbone peaks at
    ~18 GB of activations without it and ~5 GB with it (docs/finetune.md); off on GPUs."""
    if setting is None:
        setting = device.type == "cpu"
        log.info("gradient checkpointing %s (automatic on %s)", "on" if setting else "off", device.type)
    return bool(setting)


def workers_for(setting: int | None, device: torch.device) -> int:
    """``reolm.num_workers``, with null resolved: 2 on a GPU (collation overlaps its step), 0 on CPU."""
    return (2 if device.type == "cuda" else 0) if setting is None else setting


# ----------------------------------------------------------------------------- data

class PrefixDataset(Dataset):
    """Every (history, next item) pair of the users' training sequences, history cut to the
    last ``max_history`` items.  Stored as two index arrays, not as lists of lists."""

    def __init__(self, sequences: list[list[int]], max_history: int):
        self.sequences = sequences
        self.max_history = max_history
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        prefixes = np.maximum(lengths - 1, 0)
        self.seq_index = np.repeat(np.arange(len(sequences)), prefixes)
        first = np.concatenate([[0], np.cumsum(prefixes)[:-1]]) if len(prefixes) else np.zeros(0, np.int64)
        self.target_pos = np.arange(int(prefixes.sum())) - np.repeat(first, prefixes) + 1

    def __len__(self) -> int:
        return len(self.seq_index)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        seq = self.sequences[int(self.seq_index[i])]
        t = int(self.target_pos[i])
        return seq[max(0, t - self.max_history):t], seq[t]


@dataclass(frozen=True, eq=False)
class MicroBatch:
    """One micro-batch of fine-tuning: histories and the rows their targets are scored at."""

    history: PackedBatch   # the histories (MLM-masked when the collator masks)
    labels: torch.Tensor   # int64 [B]: each target's row among the candidates (pool or item table)
    pool: int | None = None  # stage 1: the index of its candidate pool in ``StepBatch.pools``

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "MicroBatch":
        return dataclasses.replace(self, history=self.history.to(device, non_blocking),
                                   labels=self.labels.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "MicroBatch":
        return dataclasses.replace(self, history=self.history.pin_memory(), labels=self.labels.pin_memory())


@dataclass(frozen=True, eq=False)
class StepBatch:
    """What one optimiser step trains on (:class:`PrefixCollate`): its micro-batches and, in stage 1,
    the candidate pools they score against (``[CLS] item`` batches, encoded with gradient)."""

    micro: list[MicroBatch]
    pools: list[PackedBatch] = field(default_factory=list)
    pool_items: list[torch.Tensor] = field(default_factory=list)  # int64 item ids of each pool's rows

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "StepBatch":
        return StepBatch([m.to(device, non_blocking) for m in self.micro],
                         [p.to(device, non_blocking) for p in self.pools],
                         [i.to(device, non_blocking=non_blocking) for i in self.pool_items])

    def pin_memory(self) -> "StepBatch":
        return StepBatch([m.pin_memory() for m in self.micro], [p.pin_memory() for p in self.pools],
                         [i.pin_memory() for i in self.pool_items])


class PrefixCollate:
    """DataLoader collate_fn of one optimiser step, a :class:`StepBatch`: ``micro`` = its
    micro-batches of ``micro_batch`` histories (MLM-masked by the collator) with their ``labels``.

    With ``negatives`` (stage 1) it also returns ``pools``, ``[CLS] item`` batches of
    candidate sets (targets plus ``negatives`` uniformly sampled items, no duplicates), and
    each micro-batch names its ``pool`` and its ``labels`` are its targets' rows in it: one
    pool per micro-batch (``shared=False``, the reference), or one pool of every target of the
    step plus the negatives (``shared=True``).  Stage 2 (``negatives=None``): ``labels`` are
    the target item indices, or their positions in ``train_items`` when given.

    ``train_items`` (sorted item indices) restricts negatives and the stage-2 softmax to the
    items that occur in training: an unseen item must not be learnt about, even as a negative.
    """

    def __init__(self, collator: PackedCollator, num_items: int, negatives: int | None,
                 micro_batch: int | None = None, shared: bool = False, train_items: np.ndarray | None = None):
        self.collator, self.num_items, self.negatives = collator, num_items, negatives
        self.micro_batch, self.shared, self.train_items = micro_batch, shared, train_items

    def __call__(self, examples: list[tuple[list[int], int]]) -> StepBatch:
        size = self.micro_batch or len(examples)
        parts = [examples[i:i + size] for i in range(0, len(examples), size)]
        targets = [np.array([t for _, t in part], dtype=np.int64) for part in parts]
        histories = [self.collator([SequenceExample(h) for h, _ in part]).history for part in parts]
        if self.negatives is None:
            rows = [t if self.train_items is None else np.searchsorted(self.train_items, t) for t in targets]
            return StepBatch([MicroBatch(h, torch.from_numpy(r.astype(np.int64))) for h, r in zip(histories, rows)])
        groups = [np.concatenate(targets)] if self.shared else targets
        pools = [self._candidates(g) for g in groups]
        micro = []
        for i, (h, t) in enumerate(zip(histories, targets)):
            pool = 0 if self.shared else i
            micro.append(MicroBatch(h, torch.from_numpy(np.searchsorted(pools[pool], t).astype(np.int64)), pool))
        return StepBatch(micro, [self.collator.collate_items(c.tolist()) for c in pools],
                         [torch.from_numpy(c.astype(np.int64)) for c in pools])

    def _candidates(self, targets: np.ndarray) -> np.ndarray:
        """Sorted unique ids of ``targets`` plus ``negatives`` fresh uniform (trained) items."""
        population = self.num_items if self.train_items is None else self.train_items
        size = self.num_items if self.train_items is None else len(self.train_items)
        sampled = self.collator.rng.choice(population, size=min(self.negatives, size), replace=False)
        return np.unique(np.concatenate([targets, sampled]))


def _epoch_order(n: int, stage: ReoLMStageSection, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shuffled example order (reproducible), capped at max_steps_per_epoch batches."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    if stage.max_steps_per_epoch:
        order = order[:stage.max_steps_per_epoch * examples_per_step(stage)]
    return order


def examples_per_step(stage: ReoLMStageSection) -> int:
    """Training prefixes per optimiser step: the micro-batch times the accumulation."""
    return stage.batch_size * stage.accumulation


def stage_rounds(dataset: Dataset, make_collate: Callable[[int], PrefixCollate], stage: ReoLMStageSection,
                 seed: int, device: torch.device, num_workers: int, progress: bool, name: str
                 ) -> Callable[[int], Iterator[StepBatch]]:
    """``batches(round)`` for the runner: round r covers part (r-1) % k of epoch (r-1) // k.

    Every round gets a collate_fn seeded from (seed, round): DataLoader workers start from a
    copy of it, so one shared collator would replay the same masks and negatives each round.
    """
    k = stage.evals_per_epoch

    def batches(step_round: int) -> Iterator[StepBatch]:
        epoch, part = divmod(step_round - 1, k)
        collate = make_collate(seed * 1_000_003 + step_round)
        order = _epoch_order(len(dataset), stage, seed, epoch)
        step = examples_per_step(stage)
        num_batches = math.ceil(len(order) / step)
        lo, hi = part * num_batches // k, (part + 1) * num_batches // k
        chunk = order[lo * step:hi * step]
        loader = DataLoader(Subset(dataset, chunk.tolist()), batch_size=step, shuffle=False,
                            collate_fn=collate, num_workers=num_workers, pin_memory=device.type == "cuda")
        desc = f"{name} epoch {epoch + 1}" + (f" ({part + 1}/{k})" if k > 1 else "")
        for batch in tqdm(loader, desc=desc, unit="step", leave=False, disable=not progress):
            yield batch.to(device)

    return batches


def steps_per_epoch(n: int, stage: ReoLMStageSection) -> int:
    steps = math.ceil(n / examples_per_step(stage))
    return min(steps, stage.max_steps_per_epoch) if stage.max_steps_per_epoch else steps


# ----------------------------------------------------------------------------- losses

@dataclass
class TrainCost:
    """Model FLOPs (forward + backward, :meth:`ReoLM.training_flops`) and examples trained on."""

    flops: float = 0.0
    examples: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"train_flops": self.flops, "train_examples": self.examples,
                "flops_per_example": self.flops / max(self.examples, 1)}


def history_loss(rec: ReoLMRecommender, micro: MicroBatch, candidates: torch.Tensor,
                 mlm_weight: float) -> torch.Tensor:
    """Cross-entropy of one micro-batch's histories over ``candidates`` (fp32 cosine scores) plus
    weighted MLM; the last layer runs on the [CLS] rows only when the model allows it."""
    model = rec.model
    with rec.autocast():
        out = model(micro.history, pooled_only=True)
        mlm = model.mlm_loss(out, micro.history) if mlm_weight > 0 else None
    loss = info_nce(out.pooled, candidates, model.config.temperature, labels=micro.labels).loss
    return loss + mlm_weight * mlm if mlm is not None else loss


def train_step(rec: ReoLMRecommender, batch: StepBatch, mlm_weight: float, cost: TrainCost) -> torch.Tensor:
    """Forward and backward of one optimiser step; returns the detached mean loss.

    Stage 1: each candidate pool is encoded once WITH gradient; the micro-batches score against
    detached copies, so their backward passes only accumulate the copies' gradients, which then
    flow through the pool encodings in one backward pass at the end.  Gradients equal those of
    one large batch, while only one micro-batch of histories is held in memory at a time.
    Stage 2 (no pools): plain accumulation against the frozen item table.  The transductive
    variant adds the candidates' ID rows to the pool encodings and to the table, so they get
    their gradients through the same backward passes.
    """
    model = rec.model
    micro = batch.micro
    total = sum(m.labels.shape[0] for m in micro)
    with rec.autocast():
        pools = [model.encode(p) for p in batch.pools]
    if batch.pool_items:  # the transductive variant: each pool's rows are its items' content + ID rows
        pools = [rec.with_item_ids(p, items) for p, items in zip(pools, batch.pool_items, strict=True)]
    copies = [p.detach().requires_grad_() for p in pools]
    table = None
    if not copies:  # stage 2: the frozen table, restricted to the items seen in training
        items = rec.train_items
        table = rec.with_item_ids(rec.item_table if items is None else rec.item_table[items], items)
    losses = []
    for m in micro:
        candidates = copies[m.pool] if copies else table
        loss = history_loss(rec, m, candidates, mlm_weight) * (m.labels.shape[0] / total)
        loss.backward()
        losses.append(loss.detach())
        cost.flops += model.training_flops(m.history, include_mlm=mlm_weight > 0, pooled_only=True)
    used = [(p, c.grad) for p, c in zip(pools, copies) if c.grad is not None]
    if used:
        torch.autograd.backward([p for p, _ in used], [g for _, g in used])
    cost.flops += sum(model.training_flops(p, include_mlm=False, pooled_only=True) for p in batch.pools)
    cost.examples += total
    return torch.stack(losses).sum()  # in the loss's own dtype (fp64 in the parity tests)


# ----------------------------------------------------------------------------- stages

class StageLog:
    """The run log seen by one stage: records tagged with the stage; epochs continue across
    stages (``epoch`` = offset + the stage's own ``stage_epoch``) so curves are one line."""

    def __init__(self, log: RunLog, offset: float = 0.0):
        self.log, self.offset = log, offset

    def write(self, record: dict[str, Any]) -> None:
        if "epoch" in record and self.offset:
            record = {**record, "stage_epoch": record["epoch"], "epoch": record["epoch"] + self.offset}
        self.log.write(record)


def run_stage(number: int, rec: ReoLMRecommender, dataset: PrefixDataset, cfg: FinetuneConfig, domain: Domain,
              log: StageLog, device: torch.device, on_improve: Callable[[float, EvalResult], None]) -> BestState:
    """Train one stage in the runner's early-stopping loop; the best weights are loaded at the end."""
    stage = cfg.reolm.stage1 if number == 1 else cfg.reolm.stage2
    name = f"reolm-stage{number}"
    seed = cfg.train.seed + number
    mlm_probability = rec.model.config.mlm_probability if stage.mlm_weight > 0 else 0.0
    negatives = cfg.reolm.negatives if number == 1 else None
    shared = cfg.reolm.negative_pool == "step"
    train_items = None if rec.train_items is None else rec.train_items.cpu().numpy()

    def make_collate(round_seed: int) -> PrefixCollate:
        return PrefixCollate(rec.collator(mlm_probability, seed=round_seed), rec.num_items, negatives,
                             micro_batch=stage.batch_size, shared=shared, train_items=train_items)
    cost = TrainCost()
    optimizer = adamw(parameter_groups(rec, cfg.reolm), stage)
    scheduler = lr_schedule(optimizer, stage, stage.epochs * steps_per_epoch(len(dataset), stage))
    train_cfg = dataclasses.replace(cfg.train, **optim_settings(stage), epochs=stage.epochs,
                                    batch_size=stage.batch_size, patience=stage.patience, eval_every=1)
    best = train_with_early_stopping(
        rec, optimizer,
        batches=stage_rounds(dataset, make_collate, stage, seed, device, workers_for(cfg.reolm.num_workers, device),
                             cfg.train.progress, name),
        loss_fn=None, step_fn=lambda batch: train_step(rec, batch, stage.mlm_weight, cost),
        validate=lambda: evaluate_split(rec, domain, "val", cfg.eval, progress=cfg.train.progress),
        on_improve=on_improve, train_cfg=train_cfg, metric=cfg.eval.metric, log=log, stage=name,
        evals_per_epoch=stage.evals_per_epoch, scheduler=scheduler)
    log.write({"stage": name, "event": "train_cost", **cost.to_json()})
    return best


def parameter_groups(rec: ReoLMRecommender, section: ReoLMSection) -> list[dict[str, Any]]:
    """The model's weights at the stage's settings, and the transductive ID rows (when on) at
    ``item_id_lr``: they train in stage 2 too, next to the sequence side, since the frozen table
    only fixes the content part of an item's vector."""
    groups: list[dict[str, Any]] = [{"params": list(rec.model.parameters())}]
    if rec.item_ids is not None:
        groups.append({"params": [rec.item_ids], "lr": section.item_id_lr})
    return groups


def _stage_summary(best: BestState, offset: float) -> dict[str, Any]:
    """``best_epoch`` counts like log.jsonl's ``epoch`` (across stages), ``best_stage_epoch`` and
    ``epochs_run`` within the stage."""
    return {"best_epoch": best.epoch + offset, "best_stage_epoch": best.epoch, "epochs_run": best.epochs_run,
            "stopped_early": best.stopped_early, "best_val": best.val}


def train_reolm(cfg: FinetuneConfig, domain: Domain, run_dir: Path, *, init: Any = None,
                backbone: Any = None) -> dict[str, Any]:
    """Trainer of the registry for ``--model reolm``: stage 1, stage 2, test; returns metrics.json."""
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    start = time.time()
    model, model_name = build_finetune_model(cfg, domain, init, backbone)
    cfg = with_weights_source(cfg, model, init, backbone)
    # The folder the weights come from (export or backbone) holds the tokenizer that goes with them.
    tokenizer = load_tokenizer(cfg.reolm.init or cfg.reolm.model.backbone)
    save_resolved(cfg, run_dir)  # again: now with the weights' source filled in
    model.gradient_checkpointing = checkpointing_for(cfg.reolm.model.gradient_checkpointing, device)
    rec = ReoLMRecommender(model, tokenizer, section=cfg.reolm, progress=cfg.train.progress).to(device)
    rec.set_precision(cfg.train.precision)
    rec.bind(domain)
    seen = item_train_counts(domain) > 0
    if not bool(seen.all()):  # items unseen in training: never negatives, never in the stage-2 softmax
        rec.train_items = torch.nonzero(seen).squeeze(1).to(device)
    if cfg.reolm.item_id_embedding:  # so their ID rows get no gradient and stay exactly 0
        rec.add_item_ids(domain.num_items)
    sequences = [seq for _, seq in sorted(domain.train.items()) if len(seq) >= 2]
    dataset = PrefixDataset(sequences, cfg.reolm.max_history_items)
    if len(dataset) == 0 and (cfg.reolm.stage1.epochs or cfg.reolm.stage2.epochs):
        raise ValueError(f"domain {domain.name!r} has no training sequence of length >= 2")
    best_dir, stage1_dir = run_dir / "best", run_dir / "stage1"

    def saver(folder: Path, stage: int, offset: float = 0.0) -> Callable[[float, EvalResult], None]:
        def on_improve(epoch: float, result: EvalResult) -> None:
            save_reolm_folder(folder, rec, model_name=model_name, domain=domain, cfg=cfg,
                              extra={"stage": stage, "epoch": epoch + offset, "val": result.metrics})
        return on_improve

    with RunLog(run_dir / "log.jsonl") as run_log:
        run_log.write({"stage": "setup", "model": model_name, "domain": domain.name, "num_items": domain.num_items,
                       "num_train_prefixes": len(dataset), "device": str(device),
                       "precision": rec.precision,
                       "parameters": sum(p.numel() for p in rec.parameters()),
                       "gradient_checkpointing": model.gradient_checkpointing,
                       "image_items": int(np.asarray(rec.images.has_image).sum())})
        if cfg.reolm.initial_validation:
            result = evaluate_split(rec, domain, "val", cfg.eval, progress=cfg.train.progress)
            run_log.write({"stage": "reolm-stage1", "epoch": 0, "val": result.metrics,
                           "val_pessimistic": result.metrics_pessimistic})
        best1 = run_stage(1, rec, dataset, cfg, domain, StageLog(run_log), device, saver(stage1_dir, 1))
        stage1_state = state_on_cpu(rec)
        rec.item_table = rec.encode_all_items()  # frozen: the best stage-1 weights' item vectors
        run_log.write({"stage": "reolm-stage2", "event": "item_table", "rows": int(rec.item_table.shape[0]),
                       "encoding": rec.last_encoding})
        offset = best1.epochs_run  # stage 2's epochs continue stage 1's, in the log and in metrics.json
        best2 = run_stage(2, rec, dataset, cfg, domain, StageLog(run_log, offset=offset), device,
                          saver(best_dir, 2, offset))
        final, final_stage = dataclasses.replace(best2, epoch=best2.epoch + offset), 2
        if best2.score < best1.score:  # stage 2 only made things worse: keep stage 1 (same item table)
            rec.load_state_dict(stage1_state)
            saver(best_dir, 1)(best1.epoch, EvalResult("val", 0, domain.num_items, best1.val, best1.val_pessimistic))
            final, final_stage = best1, 1
        final = dataclasses.replace(final, epochs_run=best1.epochs_run + best2.epochs_run)
        run_log.write({"stage": "reolm", "event": "final", "best_stage": final_stage,
                       "train_time_s": round(time.time() - start, 2)})
        return finish_run(run_dir, model_name=model_name, model=rec, domain=domain, cfg=cfg, best=final, log=run_log,
                          best_stage=final_stage, stage1=_stage_summary(best1, 0.0),
                          stage2=_stage_summary(best2, offset), precision=rec.precision,
                          train_time_s=round(time.time() - start, 2))
