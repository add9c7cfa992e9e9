"""Typed configuration of a pre-training run (``launch/pretrain.py --help`` lists every key)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from reolm.config import ConfigError, param
from reolm.model.config import ModelConfig
from reolm.optim import OptimConfig

__all__ = ["DataConfig", "PretrainOptimConfig", "LossConfig", "LogConfig", "CheckpointConfig",
           "ValidationConfig", "DistConfig", "PretrainConfig"]


@dataclass(frozen=True)
class DataConfig:
    """Streaming training data: WebDataset shards of a corpus and its derived item tables."""

    corpus: str = param("", "Corpus folder written by `reolm shard` (holds manifest.json, train/, dev/, tables/).")
    train_shards: str = param("", "Train shard spec overriding the manifest: a brace pattern "
                                  "('dir/train-{000000..000099}.tar') or a comma-separated list. '' = all "
                                  "train shards listed in the corpus manifest.")
    dev_shards: str = param("", "Dev shard spec (same forms); '' = the manifest's dev shards.")
    token_table: str = param("", "Item token table folder; '' = the corpus' tables/tokens-<key> of the "
                                 "backbone's tokenizer (built by `reolm tables tokens`).")
    image_table: str = param("", "Image feature table folder; '' = the only tables/images-* folder of the "
                                 "corpus, or no image features (every item uses the void image) if none.")
    vision: str = param("", "Vision model whose corpus image table to use (tables/images-<key>): its folder, as "
                            "given to `reolm tables images --vision`, or the table's 12-character key. "
                            "'' = the corpus' only image table. Exclusive with data.image_table.")
    resample: bool = param(True, "Draw shards with replacement per rank and worker (OpenCLIP ResampledShards): "
                                 "the stream never ends and shards may be fewer than ranks x workers. "
                                 "false = disjoint shard subsets per rank/worker, reshuffled each pass.")
    shuffle_buffer: int = param(2000, "Samples held in each worker's shuffle buffer (raw, undecoded).", ge=0)
    shuffle_initial: int = param(500, "Samples buffered before the first one is emitted.", ge=0)
    num_workers: int = param(-1, "DataLoader workers per rank; -1 = CPU count / local world size - 1 "
                                 "(at most 8, at least 0).", ge=-1)
    prefetch_factor: int = param(4, "Batches each worker prepares ahead.", ge=1)
    pin_memory: str = param("auto", "Pin host batches for faster copies: auto = when CUDA is used.",
                            choices=("auto", "true", "false"))
    replicate_stream: bool = param(False, "Every rank reads the SAME sample stream and keeps every "
                                          "world-th micro-batch, so a step's samples do not depend on how the "
                                          "global batch is split into ranks x accumulation (reproducibility "
                                          "tests; costs world x the reading).")
    record_keys: bool = param(False, "Append the keys of the samples each rank trains on to "
                                     "RUN_DIR/consumed/rank-R.tsv (step, key with its stream/draw/index): an "
                                     "audit trail of the data order, e.g. to check resumption.")
    max_bad_sample_logs: int = param(20, "Bad samples logged individually per worker (all are counted).", ge=0)


@dataclass(frozen=True)
class PretrainOptimConfig(OptimConfig):
    """Optimisation (the shared :class:`~reolm.optim.OptimConfig`: AdamW through DeepSpeed, clipping,
    warm-up + decay) plus the run's length, batch layout and precision."""

    steps: int = param(1000, "Optimizer steps of the run (fixed: every rank takes exactly this many).", ge=1)
    micro_batch_size: int = param(8, "Sequences per rank per micro-step.", ge=1)
    global_batch_size: int = param(0, "Sequences per optimizer step over all ranks; 0 = micro_batch_size x "
                                      "world size x grad_accum. When set, grad_accum is derived from it.", ge=0)
    grad_accum: int = param(1, "Micro-steps accumulated per optimizer step (ignored when global_batch_size > 0).",
                            ge=1)
    precision: str = param("auto", "Training precision: auto = bf16 on GPUs that support it and, for models at "
                                   "least 256 wide, on CPUs with native bf16 matmuls (AMX, AVX512-BF16), fp32 "
                                   "elsewhere. bf16 on CPU autocasts the forwards over fp32 weights; fp16 (GPU "
                                   "only) uses dynamic loss scaling.", choices=("auto", "bf16", "fp16", "fp32"))
    torch_adam: bool = param(True, "Use torch.optim.AdamW instead of DeepSpeed's JIT-compiled FusedAdam "
                                   "(ignored by the CPU-offload config, which needs DeepSpeedCPUAdam).")
    max_skipped_steps: int = param(20, "Abort after this many optimizer steps in a row were skipped for a "
                                       "non-finite loss or gradient.", ge=1)


@dataclass(frozen=True)
class LossConfig:
    """Pre-training objective: InfoNCE(history -> target) at model.temperature + mlm_weight x MLM."""

    mlm_weight: float = param(0.1, "Weight of the masked-language-model loss.", ge=0)
    negatives: str = param("global", "Targets used as negatives: global = every rank's micro-batch (gathered "
                                     "with gradient), local = this rank's micro-batch only.",
                           choices=("global", "local"))
    mask_duplicate_targets: bool = param(False, "Do not use a row holding the positive's own item as a negative.")


@dataclass(frozen=True)
class LogConfig:
    """Metrics: progress bar, metrics.jsonl and TensorBoard under the run directory."""

    every: int = param(10, "Log metrics every N optimizer steps (the only steps that read values to the host).",
                       ge=1)
    tensorboard: bool = param(True, "Also write TensorBoard events under RUN_DIR/tensorboard.")
    progress: bool = param(True, "Show a tqdm progress bar on rank 0.")
    peak_tflops: float = param(0.0, "Peak dense TFLOP/s of one device for MFU; 0 = look up the GPU in the table "
                                    "(bf16/fp16 dense); on CPU or unknown GPUs MFU is not reported.", ge=0)


@dataclass(frozen=True)
class CheckpointConfig:
    """DeepSpeed checkpoints + trainer state; resume."""

    every: int = param(500, "Save every N optimizer steps (and at the end); 0 = only at the end.", ge=0)
    keep_last: int = param(3, "Checkpoints kept (older ones deleted after a new one is complete).", ge=1)
    dir: str = param("", "Checkpoint folder; '' = RUN_DIR/checkpoints.")
    resume: str = param("", "'' = start fresh (refused when the checkpoint folder already holds checkpoints); "
                            "'latest' = newest complete checkpoint in dir (fresh start when there is none); "
                            "'auto' = like latest, but only this run's own checkpoints (RUN_DIR/owner.json names "
                            "the same ckpt.run_id and config; anything else is refused); or a checkpoint "
                            "folder path.")
    run_id: str = param("", "Who this run is, recorded in RUN_DIR/owner.json and checked by ckpt.resume=auto "
                            "(the Slurm script passes slurm:CLUSTER:JOBID).")
    save_on_signal: bool = param(True, "On SIGTERM or SIGUSR1 (Slurm preemption / time limit, torchrun or "
                                       "deepspeed shutting down), or when the launcher above the rank exits, "
                                       "every rank finishes its step, a checkpoint is saved and the run exits "
                                       "0 (resume with --resume latest).")


@dataclass(frozen=True)
class ValidationConfig:
    """Validation on the dev shards: next-item Recall/NDCG@k against a fixed pool, MLM accuracy."""

    every: int = param(200, "Validate every N optimizer steps (and at the end); 0 = never.", ge=0)
    max_users: int = param(2000, "Dev sequences evaluated (the first N of the dev shards).", ge=1)
    num_candidates: int = param(10000, "Candidate pool: the dev targets plus random items up to this size "
                                       "(all items when the corpus has fewer).", ge=1)
    batch_size: int = param(64, "Sequences (or items) per forward pass per rank.", ge=1)
    k: int = param(10, "Cut-off of Recall@k and NDCG@k.", ge=1)


@dataclass(frozen=True)
class DistConfig:
    """Distributed execution: DeepSpeed config and backend."""

    ds_config: str = param("ds_configs/zero2.json", "DeepSpeed JSON config; its \"auto\" fields are filled "
                                                    "from this config and the result is saved as "
                                                    "RUN_DIR/ds_config.json.")
    zero_stage: int = param(-1, "Override the ZeRO stage of ds_config; -1 = keep it.", ge=-1, le=3)
    timeout_minutes: float = param(30.0, "Collective timeout.", gt=0)


@dataclass(frozen=True)
class PretrainConfig:
    """Pre-training run."""

    run_dir: str = param("runs/pretrain", "Run directory: metrics.jsonl, tensorboard/, config.yaml, "
                                          "ds_config.json, checkpoints/.")
    seed: int = param(0, "Seed of model init, masking and data order.")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: PretrainOptimConfig = field(default_factory=PretrainOptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    val: ValidationConfig = field(default_factory=ValidationConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def check(self) -> None:
        if self.optim.warmup_steps > self.optim.steps:
            raise ConfigError(f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds optim.steps "
                              f"({self.optim.steps})")
        if self.data.vision and self.data.image_table:
            raise ConfigError("data.vision and data.image_table both choose the image table; set only one")

    def checkpoint_dir(self) -> str:
        return self.ckpt.dir or os.path.join(self.run_dir, "checkpoints")
