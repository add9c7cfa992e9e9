"""The pre-training loop: DeepSpeed engine, streaming data, losses, validation, checkpoints.

``run(cfg)`` is what ``launch/pretrain.py`` calls on every rank.  One optimizer step is
``accum`` micro-steps; each micro-step encodes the histories and the targets of one packed
micro-batch (two forward passes through the same engine), computes
``InfoNCE(history, all targets of the group) + mlm_weight x MLM`` and calls
``engine.backward``; ``engine.step`` applies the update at the accumulation boundary.  Every
rank takes exactly ``optim.steps`` steps: the data stream never ends.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from reolm.config import ConfigError, save_resolved, to_dict
from reolm.train import distributed as D
from reolm.train.checkpoint import CheckpointManager, ResumePlan, complete_checkpoints, readers, run_layout
from reolm.train.config import PretrainConfig
from reolm.train.data import (BAD_SAMPLE_KINDS, BadSampleCounter, DataError, Example, StreamPosition, StreamTracker,
                              TrainStream, build_train_loader, corpus_shards, default_num_workers, expand_shards,
                              manifest_counts, read_examples, stream_id)
from reolm.train.ds_config import (fill_ds_config, load_ds_config, lr_scheduler_factory, resolve_precision,
                                   write_ds_config)
from reolm.train.losses import PretrainLoss
from reolm.train.metrics import DeviceAccumulator, MetricsWriter, move_rows_after, peak_device_tflops, peak_memory_gib
from reolm.train.runstate import claim_run_dir, mark_running, write_status
from reolm.train.stopsignal import restore_default_action

__all__ = ["run", "TrainingAborted", "NonFiniteGuard", "resolve_tables", "build_model", "weight_decay_groups"]

log = logging.getLogger("reolm.train")
REPO_ROOT = Path(__file__).resolve().parents[2]


class TrainingAborted(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""


class NonFiniteGuard:
    """Counts optimizer steps DeepSpeed skipped for a non-finite gradient; aborts after N in a row.

    DeepSpeed's ZeRO optimizers check the gradient for inf/NaN before every update (the overflow
    check, and the invalid-norm check when clipping) and skip it; ``engine.was_step_applied()``
    reports that without another device sync.
    """

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0

    def update(self, applied: bool, step: int) -> bool:
        """Record one optimizer step; returns True when it was skipped."""
        if applied:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        log.warning("step %d skipped: non-finite loss or gradient (%d in a row)", step, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingAborted(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient (last at step "
                f"{step}); aborting. Lower optim.lr, check the data, or use bf16 instead of fp16 "
                f"(optim.precision).")
        return True


# ----------------------------------------------------------------------------- setup helpers

def resolve_tables(cfg: PretrainConfig, tokenizer: Any) -> tuple[Any, Any]:
    """(ItemTokenTable, ImageFeatureTable) memory-mapped from the configured folders.

    Without an explicit ``data.token_table`` the corpus' table for THIS tokenizer (and
    ``model.max_attr_tokens``) is used, so a table built with another tokenizer is never
    silently paired with the model.  Without image features every item uses the void image.
    """
    from reolm.data.item_table import ImageFeatureTable, ItemTokenTable
    from reolm.data.tables import find_token_table

    if cfg.data.token_table:
        tokens = ItemTokenTable.load(cfg.data.token_table)
    elif cfg.data.corpus:
        tokens = find_token_table(cfg.data.corpus, tokenizer, cfg.model.max_attr_tokens)
    else:
        raise ConfigError("data.token_table or data.corpus must be set")
    image_dir = Path(cfg.data.image_table) if cfg.data.image_table else None
    if image_dir is None and cfg.data.corpus:
        found = sorted(p for p in (Path(cfg.data.corpus) / "tables").glob("images-*")
                       if p.is_dir() and not p.name.endswith(".tmp"))
        if len(found) > 1:
            raise ConfigError(f"{cfg.data.corpus}/tables has several image tables "
                              f"({', '.join(p.name for p in found)}); choose one with data.image_table=PATH")
        image_dir = found[0] if found else None
    images = ImageFeatureTable.load(image_dir) if image_dir else ImageFeatureTable.empty(
        len(tokens), cfg.model.image_feature_dim)
    if images.dim != cfg.model.image_feature_dim:
        raise ConfigError(f"model.image_feature_dim={cfg.model.image_feature_dim} but the image table "
                          f"{image_dir} holds {images.dim}-d features")
    if len(images) != len(tokens):
        raise ConfigError(f"image table {image_dir} has {len(images)} rows, the token table {len(tokens)}")
    return tokens, images


def _shard_list(spec: str, corpus: str, split: str) -> list[str]:
    if spec:
        shards = expand_shards(spec)
    elif corpus:
        shards = corpus_shards(corpus, split)
    else:
        raise ConfigError(f"data.corpus (or data.{split}_shards) must be set")
    missing = [s for s in shards if not os.path.exists(s)]
    if len(missing) == len(shards):
        raise ConfigError(f"none of the {len(shards)} {split} shards exists (e.g. {shards[0]})")
    return shards


def build_model(cfg: PretrainConfig) -> Any:
    """Reo-LM on the configured backbone; the same init on every rank (seeded)."""
    from reolm.model import ReoLM

    if not cfg.model.backbone:
        raise ConfigError("model.backbone: set the local Hugging Face checkpoint directory of the backbone")
    torch.manual_seed(cfg.seed)
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


def _seed_everything(seed: int, rank: int) -> None:
    # Dropout and masking differ per rank; the model init was seeded identically before.
    random.seed(seed + 1000 * rank)
    np.random.seed((seed + 1000 * rank) % 2**32)
    torch.manual_seed(seed + 1000 * rank)


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
    path = Path(run_dir) / "run_info.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def _limit_threads(local_world_size: int) -> None:
    """Share the node's cores between its ranks (unless OMP_NUM_THREADS says otherwise)."""
    if "OMP_NUM_THREADS" not in os.environ:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // max(local_world_size, 1)))


@dataclass
class _Setup:
    cfg: PretrainConfig
    info: D.DistInfo
    device: torch.device
    engine: Any
    collator: Any
    tokens: Any
    images: Any
    num_items: int
    accum: int
    micro: int
    precision: str
    num_workers: int
    # Checkpointing (None where a _Setup is only used to validate a model, e.g. after export).
    ckpt: CheckpointManager | None = None
    layout: dict[str, Any] | None = None
    plan: ResumePlan | None = None  # the checkpoint to resume and how; None = a fresh start


def _load_ds(cfg: PretrainConfig) -> dict[str, Any]:
    path = Path(cfg.dist.ds_config)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path  # the shipped ds_configs/ when run from another directory
    return load_ds_config(path)


def _setup(cfg: PretrainConfig) -> _Setup:
    import deepspeed

    from reolm.data.collate import PackedCollator

    info = D.init(cfg.dist.timeout_minutes)
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    _limit_threads(info.local_world_size)
    model = build_model(cfg)
    if model.tokenizer is None:
        raise ConfigError(f"model.backbone={cfg.model.backbone} has no tokenizer files")
    tokens, images = resolve_tables(cfg, model.tokenizer)
    _seed_everything(cfg.seed, info.rank)
    precision = resolve_precision(cfg.optim.precision, device.type)
    ds_cfg = fill_ds_config(_load_ds(cfg), cfg.optim, info.world_size, device.type, cfg.dist.zero_stage,
                            hidden_size=model.backbone_config.hidden_size)
    num_workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_num_workers(info.local_world_size)
    layout = _layout(cfg, info, ds_cfg, num_workers)
    # The checkpoint to resume is picked and checked against this run's layout BEFORE anything
    # in the run directory is written: a resume that cannot work changes nothing.
    ckpt = CheckpointManager(cfg.checkpoint_dir(), cfg.ckpt.keep_last)
    plan = ckpt.plan(cfg.ckpt.resume, layout) if cfg.ckpt.resume else None
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
    return _Setup(cfg, info, device, engine, collator, tokens, images, len(tokens),
                  ds_cfg["gradient_accumulation_steps"], ds_cfg["train_micro_batch_size_per_gpu"], precision,
                  num_workers, ckpt, layout, plan)


def _layout(cfg: PretrainConfig, info: D.DistInfo, ds_cfg: dict[str, Any], num_workers: int) -> dict[str, Any]:
    """What a checkpoint of this run records about its layout (and what a resume checks)."""
    zero = ds_cfg.get("zero_optimization", {})
    offload = any((zero.get(key) or {}).get("device", "none") not in ("none", None)
                  for key in ("offload_optimizer", "offload_param"))
    return run_layout(info.world_size, int(zero.get("stage", 0)), offload, num_workers,
                      cfg.data.replicate_stream, cfg.data.resample)


class _SeededCollate:
    """Collate with a per-batch masking RNG so a batch's masks depend only on (seed, batch id).

    This makes the data of a step independent of how ranks x accumulation split the global
    batch (``data.replicate_stream``) and makes resumed runs mask the same way.
    """

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, examples: list[Example], batch_seed: int) -> dict[str, Any]:
        from reolm.data.collate import SequenceExample

        self.collator.reseed(batch_seed)
        batch = self.collator([SequenceExample(e.history.tolist(), e.target, e.domain) for e in examples])
        hist, tgt = batch["history"], batch["target"]
        batch["stats"] = {"tokens": hist["num_real_tokens"] + tgt["num_real_tokens"], "sequences": len(examples)}
        batch["keys"] = [e.key for e in examples]
        return batch


# ----------------------------------------------------------------------------- forward

def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    from reolm.data.collate import move_batch
    return move_batch(batch, device, non_blocking=True)


def _cast_features(batch: dict[str, Any], precision: str) -> None:
    # Image features are float16 on disk; the engine's module runs in bf16/fp16/fp32.
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    for part in ("history", "target"):
        if batch.get(part) is not None:
            batch[part]["image_features"] = batch[part]["image_features"].to(dtype)


def forward_losses(engine: Any, batch: dict[str, Any], loss_fn: PretrainLoss) -> Any:
    """Encode histories (with MLM) and targets, return the loss parts for one micro-batch."""
    history_out = engine(batch["history"])
    target_out = engine(batch["target"])
    module = engine.module
    positions = batch["history"]["mlm_positions"]
    mlm_logits = module.mlm_logits(history_out.mlm_hidden, positions)
    mlm_labels = batch["history"]["mlm_labels"].index_select(0, positions)
    return loss_fn(history_out.pooled, target_out.pooled, mlm_logits, mlm_labels,
                   target_ids=batch.get("target_items"))


# ----------------------------------------------------------------------------- validation

def _sharded_encode(items: list[Any], batch_size: int, encode) -> torch.Tensor:
    """Encode ``items`` split over ranks in equal-size chunks (every rank runs the same number of
    forward passes, which ZeRO-3 requires), then all-gather the vectors in the original order."""
    info = D.info()
    per_rank = math.ceil(len(items) / info.world_size / batch_size) * batch_size
    padded = items + [items[0]] * (per_rank * info.world_size - len(items))
    mine = padded[info.rank * per_rank:(info.rank + 1) * per_rank]
    vecs = torch.cat([encode(mine[i:i + batch_size]) for i in range(0, per_rank, batch_size)])
    return D.all_gather_no_grad(vecs.float().contiguous())[:len(items)]


@torch.no_grad()
def validate(setup: _Setup, examples: list[Example], pool: np.ndarray,
             skipped: dict[str, int] | None = None) -> dict[str, float]:
    """Next-item Recall@k / NDCG@k of dev targets among ``pool`` (which contains every target),
    plus MLM accuracy of the dev histories, and the ``skipped`` counts of bad dev data.

    Retrieval encodes the histories WITHOUT masking (as evaluation does); MLM accuracy comes from
    a second, masked pass with a fixed seed.  Ties rank optimistically (strictly higher only).
    Every rank encodes an equal share (ZeRO-3 needs all ranks in every forward).
    """
    from reolm.data.collate import SequenceExample

    module, collator, cfg = setup.engine.module, setup.collator, setup.cfg
    was_training = module.training
    module.eval()
    saved_prob = collator.mlm_probability
    mlm_stats = torch.zeros(2, device=setup.device)

    def prepared(batch: dict[str, Any]) -> dict[str, Any]:
        batch = _to_device(batch, setup.device)
        _cast_features({"history": batch}, setup.precision)
        return batch

    def encode_items(chunk: list[tuple[int, int]]) -> torch.Tensor:
        return module(prepared(collator.collate_items([i for i, _ in chunk], [d for _, d in chunk]))).pooled

    def history_batch(chunk: list[Example]) -> dict[str, Any]:
        return prepared(collator([SequenceExample(e.history.tolist(), None, e.domain) for e in chunk])["history"])

    def encode_histories(chunk: list[Example]) -> torch.Tensor:
        return module(history_batch(chunk)).pooled

    def mlm_pass(chunk: list[Example]) -> torch.Tensor:
        batch = history_batch(chunk)
        out = module(batch)
        pos = batch["mlm_positions"]
        if pos.shape[0]:
            pred = module.mlm_logits(out.mlm_hidden, pos).argmax(-1)
            hits = (pred == batch["mlm_labels"].index_select(0, pos)).sum().float()
            mlm_stats.add_(torch.stack([hits, hits.new_tensor(float(pos.shape[0]))]))
        return out.pooled[:, :1]

    try:
        # Items are encoded with the adapter of the domain of the sequences they are ranked for.
        domains = sorted({e.domain for e in examples})
        pool_items = [(int(i), d) for d in domains for i in pool]
        collator.mlm_probability = 0.0
        item_vecs = _sharded_encode(pool_items, cfg.val.batch_size, encode_items).view(len(domains), len(pool), -1)
        user_vecs = _sharded_encode(examples, cfg.val.batch_size, encode_histories)
        collator.mlm_probability = saved_prob
        collator.reseed([cfg.seed, 99])  # the same masks at every validation
        _sharded_encode(examples, cfg.val.batch_size, mlm_pass)
        D.all_reduce_sum(mlm_stats)
    finally:
        # (Training batches reseed the collator themselves, so its generator needs no restoring.)
        collator.mlm_probability = saved_prob
        if was_training:
            module.train()
    return ranking_metrics(module, examples, pool, domains, user_vecs, item_vecs, cfg.val.k) | {
        "val_mlm_accuracy": (mlm_stats[0] / mlm_stats[1]).item() if mlm_stats[1].item() else float("nan"),
        **(skipped or {})}


def ranking_metrics(module: Any, examples: list[Example], pool: np.ndarray, domains: list[int],
                    user_vecs: torch.Tensor, item_vecs: torch.Tensor, k: int) -> dict[str, float]:
    """Recall@k and NDCG@k of each example's target among the pool, per domain's item vectors."""
    position = {int(item): j for j, item in enumerate(pool)}
    recall = ndcg = 0.0
    for d_index, domain in enumerate(domains):
        rows = [i for i, e in enumerate(examples) if e.domain == domain]
        scores = module.score(user_vecs[rows], item_vecs[d_index])
        target_cols = torch.tensor([position[examples[i].target] for i in rows], device=scores.device)
        ranks = (scores > scores.gather(1, target_cols[:, None])).sum(dim=1).float()
        hit = ranks < k
        recall += hit.float().sum().item()
        ndcg += torch.where(hit, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks)).sum().item()
    n = max(len(examples), 1)
    return {f"val_recall@{k}": recall / n, f"val_ndcg@{k}": ndcg / n, "val_users": len(examples),
            "val_pool": len(pool), f"val_random_recall@{k}": min(k / len(pool), 1.0)}


class _ValidationSet(NamedTuple):
    examples: list[Example]
    pool: np.ndarray
    skipped: dict[str, int]  # val_skipped_samples[_KIND]: bad dev data, reported with each validation


def _validation_set(setup: _Setup) -> _ValidationSet | None:
    cfg = setup.cfg
    if cfg.val.every == 0:
        return None
    try:
        shards = _shard_list(cfg.data.dev_shards, cfg.data.corpus, "dev")
    except (ConfigError, DataError) as err:
        log.warning("no validation: %s", err)
        return None
    # Missing/unreadable dev shards and bad samples are skipped and counted, as in training.
    counter = BadSampleCounter(max_logs=5, where=" [dev]")
    expected = manifest_counts(cfg.data.corpus) if cfg.data.corpus and not cfg.data.dev_shards else None
    examples = read_examples(shards, setup.num_items, cfg.model.max_items, cfg.val.max_users, counter, expected)
    skipped = {"val_skipped_samples": counter.total,
               **{f"val_skipped_samples_{kind}": n for kind, n in counter.counts.items()}}
    if counter.total:
        log.warning("validation set: %d bad dev sample(s) skipped %s", counter.total, counter.counts)
    if not examples:
        log.warning("no validation: no readable dev samples in %d shard(s)", len(shards))
        return None
    targets = np.unique([e.target for e in examples])
    size = min(max(cfg.val.num_candidates, len(targets)), setup.num_items)
    rng = np.random.default_rng(cfg.seed + 17)
    others = np.setdiff1d(np.arange(setup.num_items), targets)
    extra = rng.choice(others, size=size - len(targets), replace=False) if size > len(targets) else []
    pool = np.sort(np.concatenate([targets, np.asarray(extra, dtype=np.int64)]))
    return _ValidationSet(examples, pool, skipped)


# ----------------------------------------------------------------------------- the loop

class _Progress:
    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="pre-training", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _batches(loader: Any, tracker: StreamTracker, replicate: bool, info: D.DistInfo) -> Iterator[dict[str, Any]]:
    """Micro-batches for this rank; with a replicated stream keep every world-th one."""
    for index, batch in enumerate(loader):
        tracker.update(batch.pop("stream"))
        if replicate and index % info.world_size != info.rank:
            continue
        yield batch


def _resume(setup: _Setup) -> tuple[dict[str, int], dict[str, Any] | None]:
    """(trainer counters, the restored stream positions and bad counts or None) after loading the plan."""
    cfg = setup.cfg
    state = {"step": 0, "samples": 0, "tokens": 0, "generation": 0, "skipped_steps": 0}
    if setup.plan is None:
        if cfg.ckpt.resume and D.is_main():
            log.info("ckpt.resume=%s: no checkpoint in %s, starting fresh", cfg.ckpt.resume, cfg.checkpoint_dir())
        return state, None
    shared, restored = setup.ckpt.load(setup.engine, setup.plan)
    state.update({k: shared[k] for k in ("step", "samples", "tokens", "skipped_steps") if k in shared})
    # A new generation re-seeds the shuffle buffers (they restart empty after a resume).
    state["generation"] = int(shared.get("generation", 0)) + 1
    if D.is_main():
        saved_world = shared.get("world_size")
        how = "" if saved_world == setup.info.world_size else f" (saved on {saved_world} ranks, universal checkpoint)"
        log.info("resumed from %s at step %d%s", setup.plan.path, state["step"], how)
    return state, restored


def _stream_ids(setup: _Setup) -> dict[int, int]:
    """worker -> global stream id of this rank's readers."""
    workers = max(setup.num_workers, 1)
    return {w: stream_id(setup.info.rank, w, workers, setup.cfg.data.replicate_stream) for w in range(workers)}


def _restore_streams(setup: _Setup, restored: dict[str, Any] | None) -> tuple[StreamTracker, dict[str, Any]]:
    """The tracker this rank continues from, and the dormant streams rank 0 keeps saving.

    Streams are re-split by global id: a stream some reader of this layout owns continues at
    its saved position; ids beyond this layout's readers (the run shrank) stay dormant, their
    positions carried in rank 0's checkpoints until a larger layout reads them again; ids new
    to this layout (the run grew) start at their first draw, which nobody has read.
    """
    workers = max(setup.num_workers, 1)
    if not restored:
        return StreamTracker(workers), {}
    saved = restored["streams"]
    mine = {w: StreamPosition(**saved[sid]) for w, sid in _stream_ids(setup).items() if sid in saved}
    dormant = {str(sid): pos for sid, pos in saved.items() if sid >= readers(setup.layout)}
    return StreamTracker(workers, mine, restored["bad"]), dormant if setup.info.rank == 0 else {}


def _train_batches(setup: _Setup, tracker: StreamTracker, generation: int) -> Iterator[dict[str, Any]]:
    """This rank's endless stream of collated micro-batches (DataLoader over :class:`TrainStream`)."""
    cfg, info = setup.cfg, setup.info
    dataset = TrainStream(_shard_list(cfg.data.train_shards, cfg.data.corpus, "train"), _SeededCollate(setup.collator),
                          setup.micro, setup.num_items, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                          num_workers=setup.num_workers, resample=cfg.data.resample,
                          shuffle_buffer=cfg.data.shuffle_buffer, shuffle_initial=cfg.data.shuffle_initial,
                          max_history=cfg.model.max_items, replicate=cfg.data.replicate_stream,
                          max_bad_logs=cfg.data.max_bad_sample_logs, start=dict(tracker.positions),
                          generation=generation,
                          expected_counts=manifest_counts(cfg.data.corpus) if cfg.data.corpus else None)
    pin = cfg.data.pin_memory == "true" or (cfg.data.pin_memory == "auto" and setup.device.type == "cuda")
    loader = build_train_loader(dataset, setup.num_workers, cfg.data.prefetch_factor, pin)
    return _batches(loader, tracker, cfg.data.replicate_stream, info)


class _Window:
    """Host-side counters of one logging window (Python numbers only: no device syncs)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.wait = 0.0       # waiting for the next batch
        self.excluded = 0.0   # validation and checkpoint time, not part of the throughput
        self.tokens = 0
        self.sequences = 0
        self.flops = 0.0

    def count_batch(self, batch: dict[str, Any], module: Any) -> None:
        self.tokens += batch["stats"]["tokens"]
        self.sequences += batch["stats"]["sequences"]
        # Analytic model FLOPs from the batch's Python ints.
        self.flops += module.training_flops(batch["history"]) + module.training_flops(batch["target"],
                                                                                       include_mlm=False)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.excluded


def _micro_step(setup: _Setup, batches: Iterator[dict[str, Any]], loss_fn: PretrainLoss, window: _Window,
                acc: DeviceAccumulator, consumed: Any, step: int) -> None:
    """Fetch one micro-batch, forward both sides, backward, and let DeepSpeed step/accumulate."""
    engine = setup.engine
    t0 = time.perf_counter()
    batch = next(batches)
    window.wait += time.perf_counter() - t0
    window.count_batch(batch, engine.module)
    keys = batch.pop("keys")
    if consumed is not None:
        consumed.write("".join(f"{step}\t{k}\n" for k in keys))
    batch = _to_device(batch, setup.device)
    _cast_features(batch, setup.precision)
    parts = forward_losses(engine, batch, loss_fn)
    engine.backward(parts.total)
    engine.step()
    acc.add(loss=parts.total.detach(), loss_contrastive=parts.contrastive, loss_mlm=parts.mlm,
            contrastive_correct=parts.contrastive_correct, mlm_tokens=parts.mlm_tokens,
            mlm_correct=parts.mlm_correct)


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Pre-train as configured; returns the last logged metrics (every rank)."""
    # Before the (long) setup, so that a stop signal during it is remembered, not fatal.
    stop = D.StopFlag() if cfg.ckpt.save_on_signal else None
    if stop is None:
        restore_default_action()
    cfg = claim_run_dir(cfg, complete_checkpoints(cfg.checkpoint_dir()))
    setup = _setup(cfg)
    engine, info = setup.engine, setup.info
    main = info.rank == 0
    ckpt = setup.ckpt
    state, restored = _resume(setup)
    tracker, dormant = _restore_streams(setup, restored)
    if main:
        # Rows the interrupted run logged after the checkpoint would repeat steps: move them aside.
        move_rows_after(Path(cfg.run_dir) / "metrics.jsonl", state["step"])
    batches = _train_batches(setup, tracker, state["generation"])
    val_set = _validation_set(setup)

    loss_fn = PretrainLoss(cfg.model.temperature, cfg.loss.mlm_weight, cfg.loss.negatives,
                           cfg.loss.mask_duplicate_targets)
    writer = MetricsWriter(cfg.run_dir, main, cfg.log.tensorboard)
    progress = _Progress(main and cfg.log.progress, cfg.optim.steps, state["step"])
    acc = DeviceAccumulator()
    peak = peak_device_tflops(cfg.log.peak_tflops) if setup.precision in ("bf16", "fp16") else (
        cfg.log.peak_tflops or None)
    guard = NonFiniteGuard(cfg.optim.max_skipped_steps)
    consumed = _consumed_log(cfg, info) if cfg.data.record_keys else None
    window = _Window()
    last: dict[str, Any] = {}
    engine.train()

    def save(step: int) -> None:
        shared = {"step": step, "samples": state["samples"], "tokens": state["tokens"],
                  "skipped_steps": state["skipped_steps"], "generation": state["generation"],
                  "config": to_dict(cfg), "backbone": engine.module.backbone_config.to_dict(),
                  "model": to_dict(engine.module.config), "layout": setup.layout}
        data = tracker.state(_stream_ids(setup))
        data["streams"].update(dormant)
        ckpt.save(engine, step, shared, {"data": data},
                  write_extra=lambda folder: _save_tokenizer(engine.module.tokenizer, folder))

    step = start_step = state["step"]
    if main:
        mark_running(cfg, start_step)
    try:
        while step < cfg.optim.steps:
            for _ in range(setup.accum):
                _micro_step(setup, batches, loss_fn, window, acc, consumed, step + 1)
            step += 1
            if guard.update(engine.was_step_applied(), step):
                state["skipped_steps"] += 1
            state["samples"] += setup.micro * setup.accum * info.world_size
            progress.update(1)

            stopping = stop is not None and stop.agreed()
            final = step == cfg.optim.steps
            save_now = final or stopping or bool(cfg.ckpt.every and step % cfg.ckpt.every == 0)
            # Log before every checkpoint too, so the saved counters (tokens seen) are exact.
            if step % cfg.log.every == 0 or save_now:
                last = _log_step(step, acc, window, setup, tracker, peak, writer, state)
                progress.update(0, loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
                window = _Window()
            if val_set is not None and cfg.val.every and (step % cfg.val.every == 0 or final):
                t0 = time.perf_counter()
                metrics = validate(setup, *val_set)
                writer.write(step, metrics, kind="val")
                last.update(metrics)
                window.excluded += time.perf_counter() - t0
            if save_now:
                if main and (final or stopping):  # before the save: a launcher may kill us right after it
                    write_status(cfg.run_dir, "finished" if final else "stopped", step, start_step,
                                 stop.reason if stopping and stop else "")
                t0 = time.perf_counter()
                save(step)
                window.excluded += time.perf_counter() - t0
            if stopping and not final:
                if main:
                    log.warning("stopped after step %d (%s); checkpoint saved, continue with "
                                "--resume latest", step, stop.reason)
                last["stopped_at"] = step
                break
    finally:
        batches.close()  # shut the DataLoader workers down now (they ignore stop signals)
        progress.close()
        writer.close()
        if consumed is not None:
            consumed.close()
    return last


def _consumed_log(cfg: PretrainConfig, info: D.DistInfo) -> Any:
    folder = Path(cfg.run_dir) / "consumed"
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / f"rank-{info.rank:05d}.tsv", "a", buffering=1)


def _log_step(step: int, acc: DeviceAccumulator, window: _Window, setup: _Setup, tracker: StreamTracker,
              peak: float | None, writer: MetricsWriter, state: dict[str, int]) -> dict[str, Any]:
    """Read the window's sums to the host (one transfer), derive rates, write JSONL/TB."""
    info, engine = setup.info, setup.engine
    elapsed = window.elapsed()
    bad = tracker.bad_counts()
    local = torch.tensor([window.tokens, window.sequences, window.flops, window.wait]
                         + [bad.get(kind, 0) for kind in BAD_SAMPLE_KINDS], dtype=torch.float64)
    if info.world_size > 1:
        import torch.distributed as dist
        local_dev = local.to(setup.device)
        dist.all_reduce(local_dev)
        local = local_dev.cpu()
    tokens, sequences, flops, wait_sum, *bad_by_kind = local.tolist()
    micro_steps = max(acc.count, 1)
    sums = acc.pop()
    ranks = info.world_size
    state["tokens"] += int(tokens)
    grad_norm = engine.get_global_grad_norm()
    tflops_per_device = flops / max(elapsed, 1e-9) / ranks / 1e12
    values: dict[str, Any] = {
        # Mean over micro-steps and ranks of each rank's share = the mean group loss.
        "loss": sums["loss"] / micro_steps / ranks,
        "loss_contrastive": sums["loss_contrastive"] / micro_steps / ranks,
        "loss_mlm": sums["loss_mlm"] / micro_steps / ranks,
        "contrastive_accuracy": sums["contrastive_correct"] / max(sequences, 1),
        "mlm_accuracy": sums["mlm_correct"] / max(sums["mlm_tokens"], 1),
        "lr": engine.get_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "samples_per_s": sequences / max(elapsed, 1e-9),
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "tflops_per_device": tflops_per_device,
        "data_wait_share": wait_sum / ranks / max(elapsed, 1e-9),
        "peak_memory_gib": peak_memory_gib(),
        "skipped_samples": int(sum(bad_by_kind)),
        "skipped_steps": state["skipped_steps"],
        "samples_seen": state["samples"],
        "tokens_seen": state["tokens"],
    }
    if peak:
        values["mfu"] = tflops_per_device / peak
    for kind, n in zip(BAD_SAMPLE_KINDS, bad_by_kind):
        if n:
            values[f"skipped_samples_{kind}"] = int(n)
    writer.write(step, values)
    return values


def _save_tokenizer(tokenizer: Any, ckpt_path: Path) -> None:
    """Tokenizer files next to the weights, so `reolm export` needs nothing but the checkpoint."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(ckpt_path / "tokenizer"))
