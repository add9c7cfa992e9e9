"""Building a pre-training run on one rank: process group, model, corpus tables, DeepSpeed engine, resume plan.

:func:`build_setup` does it in the order that keeps a failing start harmless: everything that
can be refused (the corpus, its tables, the checkpoint to resume and its layout) is checked
before rank 0 writes anything into the run directory.  The result, :class:`TrainSetup`, is
what the loop (:mod:`reolm.train.trainer`), validation and checkpointing read.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reolm.config import ConfigError, save_resolved
from reolm.data.corpus import Corpus, VisionIdentity, check_same_vision, recorded_vision
from reolm.data.tables import ImageFeatureTable, ItemTokenTable, vision_model_key
from reolm.io import write_json
from reolm.seeding import seed_everything
from reolm.train import distributed as D
from reolm.train.checkpoint import STATE_FILE, CheckpointManager, ResumePlan, read_json_file, run_layout
from reolm.train.config import PretrainConfig
from reolm.train.data import corpus_shards, default_num_workers, expand_shards, open_corpus
from reolm.train.ds_config import fill_ds_config, load_ds_config, lr_scheduler_factory, resolve_precision, write_ds_config

__all__ = ["TrainSetup", "build_setup", "build_model", "resolve_tables", "shard_list", "weight_decay_groups"]

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TrainSetup:
    """One rank's view of a run: what is built once and read by every step."""

    cfg: PretrainConfig
    info: D.DistInfo
    device: torch.device
    engine: Any
    collator: Any
    tokens: ItemTokenTable
    images: ImageFeatureTable
    num_items: int
    accum: int
    micro: int
    precision: str
    num_workers: int
    # Checkpointing (None where a setup is only used to validate a model, e.g. after export).
    ckpt: CheckpointManager | None = None
    layout: dict[str, Any] | None = None
    plan: ResumePlan | None = None  # the checkpoint to resume and how; None = a fresh start
    corpus: Corpus | None = None    # data.corpus, opened once (None with explicit shards and tables)
    vision: VisionIdentity | None = None  # which vision model made the image features (None: no images)

    def __post_init__(self) -> None:
        if self.corpus is None and self.cfg.data.corpus:
            self.corpus = open_corpus(self.cfg.data.corpus)


# ----------------------------------------------------------------------------- data

def shard_list(cfg: PretrainConfig, split: str, corpus: Corpus | None) -> list[str]:
    """The train/dev shards: ``data.<split>_shards`` if given, else the corpus manifest's."""
    spec = cfg.data.train_shards if split == "train" else cfg.data.dev_shards
    if spec:
        shards = expand_shards(spec)
    elif corpus is not None:
        shards = corpus_shards(corpus, split)
    else:
        raise ConfigError(f"data.corpus (or data.{split}_shards) must be set")
    missing = [s for s in shards if not os.path.exists(s)]
    if len(missing) == len(shards):
        raise ConfigError(f"none of the {len(shards)} {split} shards exists (e.g. {shards[0]})")
    return shards


def _token_table(cfg: PretrainConfig, tokenizer: Any, corpus: Corpus | None) -> ItemTokenTable:
    # The corpus' table for THIS tokenizer and max_attr_tokens, never one built with another.
    if cfg.data.token_table:
        return ItemTokenTable.load(cfg.data.token_table)
    if corpus is not None:
        return corpus.token_table(tokenizer, cfg.model.max_attr_tokens)
    raise ConfigError("data.token_table or data.corpus must be set")


def _vision_key(vision: str) -> tuple[str, str | None]:
    """(table key, vision folder or None) of ``data.vision``: a table key as is, else a model folder."""
    if re.fullmatch(r"[0-9a-f]{12}", vision) and not Path(vision).exists():
        return vision, None
    if not Path(vision).is_dir():
        raise ConfigError(f"data.vision: {vision} is neither a vision model folder nor a 12-character table key")
    return vision_model_key(vision), vision


def _tables(cfg: PretrainConfig, tokenizer: Any, corpus: Corpus | None
            ) -> tuple[ItemTokenTable, ImageFeatureTable, VisionIdentity | None]:
    """(token table, image table, the vision model behind the image table or None without one)."""
    tokens = _token_table(cfg, tokenizer, corpus)
    where = cfg.data.image_table or (corpus.root / "tables" if corpus is not None else None)
    if cfg.data.image_table:
        images = ImageFeatureTable.load(cfg.data.image_table)
    elif cfg.data.vision and corpus is None:
        raise ConfigError("data.vision picks one of a corpus' image tables, but data.corpus is not set; "
                          "name the table folder with data.image_table instead")
    elif cfg.data.vision:
        images = corpus.image_table(*_vision_key(cfg.data.vision))
    else:
        images = corpus.image_table() if corpus is not None else None
    vision = VisionIdentity.of_table(images) if images is not None else None
    if images is None:  # every item uses the void image
        images = ImageFeatureTable.empty(len(tokens), cfg.model.image_feature_dim)
    if images.dim != cfg.model.image_feature_dim:
        raise ConfigError(f"model.image_feature_dim={cfg.model.image_feature_dim} but the image table "
                          f"{where} holds {images.dim}-d features")
    if len(images) != len(tokens):
        raise ConfigError(f"image table {where} has {len(images)} rows, the token table {len(tokens)}")
    return tokens, images, vision


def resolve_tables(cfg: PretrainConfig, tokenizer: Any, corpus: Corpus | None = None
                   ) -> tuple[ItemTokenTable, ImageFeatureTable]:
    """(ItemTokenTable, ImageFeatureTable) memory-mapped from the configured folders.

    Without an explicit ``data.token_table`` the corpus' table for this tokenizer is used;
    without ``data.image_table`` the corpus' image table (several: an error naming each one's
    vision model); without image features every item uses the void image.
    """
    if corpus is None and cfg.data.corpus:
        corpus = open_corpus(cfg.data.corpus)
    return _tables(cfg, tokenizer, corpus)[:2]


# ----------------------------------------------------------------------------- model and engine

def build_model(cfg: PretrainConfig) -> Any:
    """Reo-LM on the configured backbone; the same init on every rank (seeded)."""
    from reolm.model import ReoLM

    if not cfg.model.backbone:
        raise ConfigError("model.backbone: set the local Hugging Face checkpoint directory of the backbone")
    seed_everything(cfg.seed)  # the same init on every rank
    model = ReoLM.from_backbone(cfg.model.backbone, cfg.model, load_tokenizer=True)
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


def build_setup(cfg: PretrainConfig) -> TrainSetup:
    """Everything one rank needs before its first step (collective: every rank calls it)."""
    import deepspeed

    from reolm.data.collate import PackedCollator

    info = D.init(cfg.dist.timeout_minutes)
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    _limit_threads(info.local_world_size)
    model = build_model(cfg)
    if model.tokenizer is None:
        raise ConfigError(f"model.backbone={cfg.model.backbone} has no tokenizer files")
    corpus = open_corpus(cfg.data.corpus) if cfg.data.corpus else None
    tokens, images, vision = _tables(cfg, model.tokenizer, corpus)
    seed_everything(cfg.seed, info.rank)  # dropout and masking differ between ranks; the init did not
    precision = resolve_precision(cfg.optim.precision, device.type)
    ds_cfg = fill_ds_config(_load_ds(cfg), cfg.optim, info.world_size, device.type, cfg.dist.zero_stage,
                            hidden_size=model.backbone_config.hidden_size)
    num_workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_num_workers(info.local_world_size)
    layout = _layout(cfg, info, ds_cfg, num_workers)
    # The checkpoint to resume is picked and checked against this run's layout BEFORE anything
    # in the run directory is written: a resume that cannot work changes nothing.
    ckpt = CheckpointManager(cfg.checkpoint_dir(), cfg.ckpt.keep_last)
    plan = ckpt.plan(cfg.ckpt.resume, layout) if cfg.ckpt.resume else None
    _check_resumed_vision(plan, vision)
    if plan is not None and plan.universal:
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
    if info.rank == 0:
        write_ds_config(ds_cfg, cfg.run_dir)
        save_resolved(cfg, cfg.run_dir)
        _write_run_info(cfg.run_dir, info, device, precision)
    scheduler = None if "scheduler" in ds_cfg else lr_scheduler_factory(cfg.optim)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=weight_decay_groups(
        model, cfg.optim.weight_decay), config=ds_cfg, lr_scheduler=scheduler)
    collator = PackedCollator.from_config(tokens, images, model.tokenizer, cfg.model, seed=cfg.seed)
    return TrainSetup(cfg, info, device, engine, collator, tokens, images, len(tokens),
                      ds_cfg["gradient_accumulation_steps"], ds_cfg["train_micro_batch_size_per_gpu"], precision,
                      num_workers, ckpt, layout, plan, corpus, vision)
