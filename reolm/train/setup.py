"""Building a pre-training run on one rank: process group, model, corpus tables, DeepSpeed engine, resume plan.

:func:`build_setup` does it in the order that keeps a failing start harmless: everything that
can be refused (the corpus, its tables, the checkpoint to resume, its layout and the vision model
of its image features) is checked before rank 0 writes anything into the run directory.  The
result, :class:`TrainSetup`, is a few typed pieces that the loop (:mod:`reolm.train.trainer`),
validation and checkpointing read.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from reolm.config import ConfigError, save_resolved
from reolm.data.collate import PackedCollator
from reolm.data.corpus import Corpus
from reolm.data.tables import (ImageFeatureTable, ItemTables, ItemTokenTable, VisionIdentity, check_same_vision,
                               load_tokenizer, recorded_vision, vision_model_key)
from reolm.io import write_json
from reolm.seeding import seed_everything
from reolm.train import distributed as D
from reolm.train.checkpoint import CheckpointManager
from reolm.train.checkpoint_files import STATE_FILE, ResumePlan, read_json_file, run_layout
from reolm.train.config import PretrainConfig
from reolm.train.data import Readers, default_num_workers, open_corpus
from reolm.train.ds_config import (fill_ds_config, forward_autocast, load_ds_config, lr_scheduler_factory,
                                   resolve_precision, write_ds_config)

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

__all__ = ["TrainSetup", "RankContext", "TrainInputs", "BatchShape", "Checkpoints", "build_setup", "build_model",
           "resolve_tables", "weight_decay_groups"]

REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- the pieces of a setup

@dataclass(frozen=True)
class RankContext:
    """Where this rank runs: its place in the process group, its device and precision, its data readers."""

    info: D.DistInfo
    device: torch.device
    precision: str
    readers: Readers

    def autocast(self) -> contextlib.AbstractContextManager:
        """Around every forward of the run: bf16 autocast on a CPU bf16 run (the engine stays fp32)."""
        return forward_autocast(self.precision, self.device)


@dataclass(frozen=True)
class TrainInputs:
    """What the run reads: the corpus (None with explicit shards and tables), its tables, the tokenizer
    they were rendered with (the backbone's; checkpoints save its files), the collator."""

    corpus: Corpus | None
    tables: ItemTables
    tokenizer: Any
    collator: PackedCollator

    @property
    def num_items(self) -> int:
        return self.tables.num_items


@dataclass(frozen=True)
class BatchShape:
    """Sequences per rank per micro-step, and micro-steps per optimizer step."""

    micro: int
    accum: int


@dataclass(frozen=True)
class Checkpoints:
    """Where checkpoints go, the layout they record, and the checkpoint to resume (None: a fresh start)."""

    manager: CheckpointManager
    layout: dict[str, Any]
    plan: ResumePlan | None


@dataclass(frozen=True)
class TrainSetup:
    """One rank's view of a run: what is built once and read by every step."""

    cfg: PretrainConfig
    rank: RankContext
    inputs: TrainInputs
    engine: "DeepSpeedEngine"
    batch: BatchShape
    # None where a setup is only used to validate a model (e.g. after export).
    checkpoints: Checkpoints | None = None


# ----------------------------------------------------------------------------- tables

def _vision_key(vision: str) -> tuple[str, str | None]:
    """(table key, vision folder or None) of ``data.vision``: a table key as is, else a model folder."""
    if re.fullmatch(r"[0-9a-f]{12}", vision) and not Path(vision).exists():
        return vision, None
    if not Path(vision).is_dir():
        raise ConfigError(f"data.vision: {vision} is neither a vision model folder nor a 12-character table key")
    return vision_model_key(vision), vision


def resolve_tables(cfg: PretrainConfig, tokenizer: Any, corpus: Corpus | None = None) -> ItemTables:
    """The run's token and image tables (memory-mapped) and the vision model behind the images.

    Without an explicit ``data.token_table`` the corpus' table for this tokenizer is used;
    without ``data.image_table`` the corpus' image table of ``data.vision``, or its only one
    (several: an error naming each one's vision model); without image features every item uses
    the void image.  ``corpus``: ``data.corpus`` when the caller has opened it already.
    """
    data, model = cfg.data, cfg.model
    if corpus is None and data.corpus:
        corpus = open_corpus(data.corpus)
    if corpus is not None:
        key, folder = _vision_key(data.vision) if data.vision else (None, None)
        return corpus.item_tables(tokenizer, model.max_attr_tokens, model.image_feature_dim, vision_key=key,
                                  vision_dir=folder, token_dir=data.token_table, image_dir=data.image_table)
    if not data.token_table:
        raise ConfigError("data.token_table or data.corpus must be set")
    if data.vision:
        raise ConfigError("data.vision picks one of a corpus' image tables, but data.corpus is not set; "
                          "name the table folder with data.image_table instead")
    images = ImageFeatureTable.load(data.image_table) if data.image_table else None
    return ItemTables.checked(ItemTokenTable.load(data.token_table), images, model.image_feature_dim,
                              data.image_table or None)


# ----------------------------------------------------------------------------- model and engine

def item_inputs(cfg: PretrainConfig) -> tuple[Any, Corpus | None, ItemTables]:
    """(tokenizer, corpus, tables) of a run: the backbone's tokenizer (its ids are the model's
    vocabulary) and the corpus tables made with it."""
    tokenizer = load_tokenizer(cfg.model.backbone)
    corpus = open_corpus(cfg.data.corpus) if cfg.data.corpus else None
    return tokenizer, corpus, resolve_tables(cfg, tokenizer, corpus)


def build_model(cfg: PretrainConfig) -> Any:
    """Reo-LM on the configured backbone; the same init on every rank (seeded)."""
    from reolm.model import ReoLM

    if not cfg.model.backbone:
        raise ConfigError("model.backbone: set the local Hugging Face checkpoint directory of the backbone")
    seed_everything(cfg.seed)  # the same init on every rank
    model = ReoLM.from_backbone(cfg.model.backbone, cfg.model)
    model.set_routing("domain")
    return model


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on biases, LayerNorm weights and embedding-like vectors (the usual BERT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _limit_threads(local_world_size: int) -> None:
    """Share the node's cores between its ranks (unless OMP_NUM_THREADS says otherwise)."""
    if "OMP_NUM_THREADS" not in os.environ:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // max(local_world_size, 1)))


def _load_ds(cfg: PretrainConfig) -> dict[str, Any]:
    path = Path(cfg.dist.ds_config)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path  # the shipped ds_configs/ when run from another directory
    return load_ds_config(path)


def _layout(cfg: PretrainConfig, info: D.DistInfo, ds_cfg: dict[str, Any], num_workers: int) -> dict[str, Any]:
    """What a checkpoint of this run records about its layout (and what a resume checks)."""
    zero = ds_cfg.get("zero_optimization", {})
    offload = any((zero.get(key) or {}).get("device", "none") not in ("none", None)
                  for key in ("offload_optimizer", "offload_param"))
    return run_layout(info.world_size, int(zero.get("stage", 0)), offload, num_workers,
                      cfg.data.replicate_stream, cfg.data.resample)


def _write_run_info(run_dir: str, info: D.DistInfo, device: torch.device, precision: str) -> None:
    """RUN_DIR/run_info.json: how this run was laid out (ranks, nodes, backend, device, precision)."""
    import torch.distributed as dist
    record = {"world_size": info.world_size, "local_world_size": info.local_world_size, "nodes": info.num_nodes,
              "backend": dist.get_backend() if dist.is_initialized() else "none", "device": device.type,
              "precision": precision, "torch": torch.__version__, "threads_per_rank": torch.get_num_threads(),
              "launched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if "SLURM_JOB_ID" in os.environ:  # which start of a (requeued) Slurm job this is
        record["slurm"] = {"job_id": os.environ["SLURM_JOB_ID"],
                           "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                           "nodelist": os.environ.get("SLURM_JOB_NODELIST", "")}
    write_json(Path(run_dir) / "run_info.json", record)


def _check_resumed_vision(plan: ResumePlan | None, vision: VisionIdentity | None) -> None:
    """A resume must keep the image features of the same vision model (refused before any write)."""
    if plan is None:
        return
    state_file = plan.path / STATE_FILE
    check_same_vision(recorded_vision(read_json_file(state_file), str(state_file)), vision,
                      f"checkpoint {plan.path}", "this run's image table")


def _rank_context(cfg: PretrainConfig, info: D.DistInfo, hidden_size: int) -> RankContext:
    """This rank's device (its local GPU, else the CPU), precision (for a model ``hidden_size`` wide)
    and data readers."""
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_num_workers(info.local_world_size)
    readers = Readers(rank=info.rank, world_size=info.world_size, workers=workers,
                      replicate=cfg.data.replicate_stream)
    return RankContext(info=info, device=device, precision=resolve_precision(cfg.optim.precision, device.type, hidden_size),
                       readers=readers)


def build_setup(cfg: PretrainConfig) -> TrainSetup:
    """Everything one rank needs before its first step (collective: every rank calls it)."""
    import deepspeed

    info = D.init(cfg.dist.timeout_minutes)
    _limit_threads(info.local_world_size)
    model = build_model(cfg)
    rank = _rank_context(cfg, info, model.backbone_config.hidden_size)
    tokenizer, corpus, tables = item_inputs(cfg)
    seed_everything(cfg.seed, info.rank)  # dropout and masking differ between ranks; the init did not
    ds_cfg = fill_ds_config(_load_ds(cfg), cfg.optim, info.world_size, rank.device.type, cfg.dist.zero_stage,
                            hidden_size=model.backbone_config.hidden_size)
    layout = _layout(cfg, info, ds_cfg, rank.readers.workers)
    # The checkpoint to resume is picked and checked against this run's layout BEFORE anything
    # in the run directory is written: a resume that cannot work changes nothing.
    manager = CheckpointManager(cfg.checkpoint_dir(), cfg.ckpt.keep_last)
    plan = manager.plan(cfg.ckpt.resume, layout) if cfg.ckpt.resume else None
    _check_resumed_vision(plan, tables.vision)
    if plan is not None and plan.universal:
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
    if info.rank == 0:
        write_ds_config(ds_cfg, cfg.run_dir)
        save_resolved(cfg, cfg.run_dir)
        _write_run_info(cfg.run_dir, info, rank.device, rank.precision)
    scheduler = None if "scheduler" in ds_cfg else lr_scheduler_factory(cfg.optim)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=weight_decay_groups(
        model, cfg.optim.weight_decay), config=ds_cfg, lr_scheduler=scheduler)
    collator = PackedCollator.from_config(tables.tokens, tables.images, tokenizer, cfg.model, seed=cfg.seed)
    inputs = TrainInputs(corpus=corpus, tables=tables, tokenizer=tokenizer, collator=collator)
    batch = BatchShape(micro=ds_cfg["train_micro_batch_size_per_gpu"], accum=ds_cfg["gradient_accumulation_steps"])
    return TrainSetup(cfg=cfg, rank=rank, inputs=inputs, engine=engine, batch=batch,
                      checkpoints=Checkpoints(manager=manager, layout=layout, plan=plan))
