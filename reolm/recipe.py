"""The paper's recipe as one pipeline: Amazon 2018 raw files -> pre-training on Slurm -> Table 2.

``launch/reproduce.py --config launch/configs/reproduce/paper.yaml --dry-run`` prints every
command with its inputs; without ``--dry-run`` it runs them in order (resumable, see
:mod:`reolm.pipeline`).  The stages, per category:

1. ``reolm prepare amazon`` (text pass) also writes the URL list of the kept items' images;
2. ``img2dataset`` downloads them into WebDataset shards;
3. ``reolm prepare amazon --image-shards`` (final pass) writes the processed folder with images;

then ``reolm shard`` over the pre-training categories, the token and image feature tables,
``sbatch --wait launch/slurm/pretrain.sbatch`` (nodes x GPUs; the dry run states the expected
GPU-hours from :func:`reolm.model.encoder.training_flops`), ``reolm export checkpoint``, zero-shot
evaluation on the held-out pre-training category, fine-tuning of every downstream domain
(Reo-LM from the export, Reo-LM from the backbone alone, the ID baselines) and ``reolm report``.
``docs/reproduce.md`` explains each choice.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from reolm.config import ConfigError, load_config, param
from reolm.model.encoder import training_flops
from reolm.model.hf_checkpoint import BackboneConfig
from reolm.pipeline import REPO_ROOT, Stage, console_script, deepspeed_launcher, python_command, reolm_command
from reolm.train.checkpoint import step_tag

__all__ = ["RecipeConfig", "PrepareFilters", "CostModel", "recipe_stages", "pretraining_cost", "print_results",
           "refuse_if_job_active", "load_recipe", "RECFORMER_PRETRAIN",
           "RECFORMER_DEV", "PAPER_DOWNSTREAM"]

# The reference implementation's pre-training categories (Recformer, pretrain_data/*.py): seven
# for training and CDs_and_Vinyl as the held-out validation category.
RECFORMER_PRETRAIN = ["Automotive", "Cell_Phones_and_Accessories", "Clothing_Shoes_and_Jewelry", "Electronics",
                      "Grocery_and_Gourmet_Food", "Home_and_Kitchen", "Movies_and_TV"]
RECFORMER_DEV = "CDs_and_Vinyl"
# The six downstream domains of the paper's Table 2 -> their Amazon 2018 file names.
PAPER_DOWNSTREAM = {"Scientific": "Industrial_and_Scientific", "Instruments": "Musical_Instruments",
                    "Arts": "Arts_Crafts_and_Sewing", "Office": "Office_Products", "Games": "Video_Games",
                    "Pet": "Pet_Supplies"}
BASELINES = ("sasrec", "gru4rec", "bert4rec", "pop")


@dataclass(frozen=True)
class PrepareFilters:
    """Options of one `reolm prepare amazon` pass (see docs/data-ingest.md for each)."""

    user_k: int = param(3, "--user-k: keep users with at least this many interactions (>= 3 for leave-one-out).",
                        ge=3)
    item_k: int = param(0, "--item-k: item k-core (0 = off: the 5-core files are already filtered).", ge=0)
    duplicates: str = param("keep", "--duplicates: the reference keeps repeated reviews.",
                            choices=("keep", "exact", "user-item"))
    require_title: bool = param(True, "--require-title: drop items whose metadata has no title.")
    category: str = param("full", "--category: full = the category path joined by spaces (the reference).",
                          choices=("full", "drop-top"))

    def flags(self) -> list[str]:
        return ["--user-k", str(self.user_k), "--item-k", str(self.item_k), "--duplicates", self.duplicates,
                "--require-title" if self.require_title else "--no-require-title", "--category", self.category]


@dataclass(frozen=True)
class CostModel:
    """Assumptions of the pre-training cost estimate the dry run prints (replace them with measured values)."""

    items_per_sequence: float = param(9.3, "Mean items per pre-training sequence (the paper's corpus: 33.57M "
                                           "interactions / 3.61M users); capped by model.max_history_items.", gt=0)
    tokens_per_item: float = param(40.0, "Mean tokens per item (category path + title + brand with their keys, "
                                         "plus the image token); the token table's mean row length once built.",
                                   gt=0)
    gpu_peak_tflops: float = param(989.4, "Dense bf16 peak of one GPU (H100/H200 SXM: 989.4).", gt=0)
    mfu: float = param(0.2, "Assumed model FLOPs utilisation (bench/throughput.py measures it on the GPU).",
                       gt=0, le=1)


@dataclass(frozen=True)
class RecipeConfig:
    """The paper's recipe: which raw files, where outputs go, which models, how many GPUs."""

    raw_dir: str = param("raw", "Folder of the Amazon 2018 files: <Category>_5.json.gz (5-core reviews) and "
                                "meta_<Category>.json.gz.")
    work_dir: str = param("work/paper", "Everything the recipe writes: data/, images/, shards/, runs/, exports/, "
                                        "results/.")
    backbone: str = param("", "Local HF checkpoint of the backbone (the paper: MiniLMv2 L12 H384 with RoBERTa's "
                              "vocabulary). Required.")
    vision: str = param("", "Local HF vision checkpoint for image features (BEiT-3 in the reference, which "
                            "transformers does not ship; e.g. openai/clip-vit-base-patch16, 512-d). '' = no images.")
    pretrain_categories: list[str] = param(list(RECFORMER_PRETRAIN), "Pre-training categories (Amazon file names).")
    dev_category: str = param(RECFORMER_DEV, "Held-out pre-training category, evaluated zero-shot by the export "
                                             "(the reference's pre-training validation); '' = none.")
    downstream: dict[str, str] = param(dict(PAPER_DOWNSTREAM), "Downstream domains: name -> Amazon file name.")
    pretrain_filters: PrepareFilters = field(default_factory=PrepareFilters)
    downstream_filters: PrepareFilters = field(
        default_factory=lambda: PrepareFilters(user_k=4, require_title=False))
    downloader: list[str] = param(["img2dataset"], "The img2dataset command (it pins webdataset<0.3, so it usually "
                                                   "lives in its own virtual environment: name its bin/img2dataset "
                                                   "here; a relative path with a '/' is taken from the repository).")
    img2dataset_processes: int = param(16, "img2dataset --processes_count.", ge=1)
    img2dataset_threads: int = param(64, "img2dataset --thread_count.", ge=1)
    img2dataset_timeout: int = param(10, "img2dataset --timeout: seconds per URL before it counts as failed.", ge=1)
    img2dataset_retries: int = param(0, "img2dataset --retries per failed URL.", ge=0)
    image_size: int = param(512, "img2dataset --image_size (keep_ratio, no upscaling); prepare re-checks it.", ge=32)
    pretrain_launcher: str = param("slurm", "slurm = sbatch --wait launch/slurm/pretrain.sbatch on `nodes` nodes; "
                                            "deepspeed = the deepspeed launcher on this machine (nodes must be 1).",
                                   choices=("slurm", "deepspeed"))
    nodes: int = param(2, "Slurm nodes for pre-training.", ge=1)
    gpus_per_node: int = param(8, "GPUs per node (pre-training; the vision features use one node's GPUs); with "
                                  "cpu=true the number of CPU ranks per node.", ge=1)
    cpu: bool = param(False, "Train on CPU ranks (gloo): no GPUs are requested from Slurm (the tiny preset).")
    sbatch_options: list[str] = param([], "Extra sbatch options for pre-training, e.g. [--partition=gpu, "
                                          "--account=me, --time=24:00:00].")
    pretrain_config: str = param("launch/configs/pretrain/paper.yaml", "Pre-training config (PretrainConfig YAML).")
    pretrain_overrides: list[str] = param([], "Extra key=value overrides of the pre-training config.")
    finetune_config: str = param("launch/configs/finetune/reolm.yaml", "Reo-LM fine-tuning config.")
    baseline_config: str = param("launch/configs/finetune/baselines.yaml", "ID baselines' config.")
    baselines: list[str] = param(list(BASELINES), "ID baselines trained on every downstream domain.",
                                 choices=BASELINES)
    no_pretrain_ablation: bool = param(True, "Also fine-tune Reo-LM from the backbone alone (no pre-training).")
    cost: CostModel = field(default_factory=CostModel)

    def check(self) -> None:
        if not self.pretrain_categories:
            raise ConfigError("pretrain_categories: at least one category is needed")
        if not self.downstream:
            raise ConfigError("downstream: at least one domain is needed")
        if not self.downloader:
            raise ConfigError("downloader: name the img2dataset command")
        if self.pretrain_launcher == "deepspeed" and self.nodes != 1:
            raise ConfigError(f"nodes={self.nodes}: the deepspeed launcher runs on this machine only (nodes=1); "
                              f"use pretrain_launcher=slurm for several nodes")


def _repo_path(path: str) -> Path:
    """Config files named relative to the repository (as the stages run from its root)."""
    return Path(path) if Path(path).is_absolute() else REPO_ROOT / path


def _absolute(cfg: RecipeConfig) -> RecipeConfig:
    """Data and model paths resolved against the current directory, where the user typed them."""
    def resolve(path: str) -> str:
        return str(Path(path).resolve()) if path else path
    return dataclasses.replace(cfg, raw_dir=resolve(cfg.raw_dir), work_dir=resolve(cfg.work_dir),
                               backbone=resolve(cfg.backbone), vision=resolve(cfg.vision))


def _raw(cfg: RecipeConfig, category: str) -> tuple[Path, Path]:
    raw = Path(cfg.raw_dir)
    return raw / f"{category}_5.json.gz", raw / f"meta_{category}.json.gz"


def _prepare_stages(cfg: RecipeConfig, name: str, category: str, out: Path, filters: PrepareFilters) -> list[Stage]:
    """Text pass (+ image URL list) -> img2dataset -> final pass with the image shards; one pass without images."""
    reviews, meta = _raw(cfg, category)
    work = Path(cfg.work_dir)
    base = ["prepare", "amazon", "--reviews", str(reviews), "--meta", str(meta), "--name", name, *filters.flags()]
    if not cfg.vision:
        return [Stage(f"prepare {name}", reolm_command(*base, "--out", str(out)), out / "domain.json",
                      inputs=[reviews, meta])]
    text, urls, images = work / "data" / "text" / name, work / "images" / "urls" / f"{name}.txt", work / "images" / name
    return [
        Stage(f"prepare {name} (text, image URLs)",
              reolm_command(*base, "--out", str(text), "--write-image-urls", str(urls)), text / "domain.json",
              inputs=[reviews, meta], outputs=[urls]),
        Stage(f"download images of {name} (img2dataset)",
              [*_downloader(cfg), "--url_list", str(urls), "--input_format", "txt", "--output_format", "webdataset",
               "--output_folder", str(images), "--image_size", str(cfg.image_size), "--resize_mode", "keep_ratio",
               "--resize_only_if_bigger", "True", "--processes_count", str(cfg.img2dataset_processes),
               "--thread_count", str(cfg.img2dataset_threads), "--encode_format", "jpg",
               "--timeout", str(cfg.img2dataset_timeout), "--retries", str(cfg.img2dataset_retries),
               "--incremental_mode", "incremental"],
              # img2dataset leaves no completion marker; re-running it resumes (incremental mode), so the
              # download counts as done once the final pass that reads it is.
              out / "domain.json", inputs=[urls], outputs=[images],
              # albumentations (imported by img2dataset) asks PyPI for a newer version on every start.
              env={"NO_ALBUMENTATIONS_UPDATE": "1"}),
        Stage(f"prepare {name} (with images)",
              reolm_command(*base, "--out", str(out), "--image-shards", str(images / "*.tar")), out / "domain.json",
              inputs=[reviews, meta, images]),
    ]


def _downloader(cfg: RecipeConfig) -> list[str]:
    """The img2dataset command; a relative path (``.venv-img2dataset/bin/img2dataset``) is the repository's."""
    first, *rest = cfg.downloader
    if "/" in first and not Path(first).is_absolute():
        first = str(REPO_ROOT / first)
    return [first, *rest]


def pretraining_cost(cfg: RecipeConfig) -> dict[str, float]:
    """Expected pre-training FLOPs and GPU-hours from the config and :class:`CostModel`'s assumptions."""
    from reolm.train.config import PretrainConfig

    pre = load_config(PretrainConfig, [_repo_path(cfg.pretrain_config)], cfg.pretrain_overrides)
    config_json = Path(cfg.backbone) / "config.json"
    if config_json.is_file():
        backbone = BackboneConfig.from_dict(json.loads(config_json.read_text()))
    else:  # the paper's backbone, MiniLMv2 L12 H384 with RoBERTa's 50,265-token vocabulary
        backbone = BackboneConfig(model_type="roberta", vocab_size=50265, hidden_size=384, num_hidden_layers=12,
                                  num_attention_heads=12, intermediate_size=1536)
    cm, model = cfg.cost, pre.model
    # A train sample is a user's sequence without its val and test items; its last item is the target.
    history_items = min(max(cm.items_per_sequence - 3, 1), model.max_history_items)
    history = min(1 + history_items * cm.tokens_per_item, model.max_tokens)  # [CLS] + items
    target = 1 + cm.tokens_per_item
    global_batch = pre.optim.global_batch_size or pre.optim.micro_batch_size * cfg.nodes * cfg.gpus_per_node
    per_sequence = training_flops(backbone, model, int(history + target), int(history ** 2 + target ** 2),
                                  int(model.mlm_probability * history))
    total = per_sequence * global_batch * pre.optim.steps
    gpu_hours = total / (cm.gpu_peak_tflops * 1e12 * cm.mfu) / 3600
    return {"steps": pre.optim.steps, "global_batch": global_batch, "tokens_per_sequence": history + target,
            "flops": total, "gpu_hours": gpu_hours, "wall_hours": gpu_hours / (cfg.nodes * cfg.gpus_per_node)}


def recipe_stages(cfg: RecipeConfig) -> list[Stage]:
    """Every command of the recipe, in order."""
    if not cfg.backbone:
        raise ConfigError("backbone: set the local HF checkpoint directory of the backbone "
                          "(e.g. backbone=/models/MiniLM-L12-H384)")
    cfg = _absolute(cfg)
    work = Path(cfg.work_dir)
    data, shards = work / "data", work / "shards" / "pretrain"
    runs, export = work / "runs", work / "exports" / "reolm-pretrained"
    backbone = Path(cfg.backbone)
    stages: list[Stage] = []
    pretrain_dirs = [data / "pretrain" / c for c in cfg.pretrain_categories]
    for category, out in zip(cfg.pretrain_categories, pretrain_dirs):
        stages += _prepare_stages(cfg, category, category, out, cfg.pretrain_filters)
    dev_dir = data / "heldout" / cfg.dev_category
    if cfg.dev_category:
        stages += _prepare_stages(cfg, cfg.dev_category, cfg.dev_category, dev_dir, cfg.pretrain_filters)
    downstream = {name: data / "downstream" / name for name in cfg.downstream}
    for name, category in cfg.downstream.items():
        stages += _prepare_stages(cfg, name, category, downstream[name], cfg.downstream_filters)
    stages.append(Stage("shard the pre-training corpus",
                        reolm_command("shard", "--out", str(shards), *map(str, pretrain_dirs)),
                        shards / "manifest.json", inputs=list(pretrain_dirs)))
    stages.append(Stage("token table (corpus)",
                        reolm_command("tables", "tokens", "--tokenizer", str(backbone), "--corpus", str(shards)),
                        shards / "tables" / "tokens-*" / "table.json", inputs=[backbone, shards / "manifest.json"]))
    evaluated = [*([dev_dir] if cfg.dev_category else []), *downstream.values()]
    if cfg.vision:
        # Data-parallel over one node's GPUs; on CPU one process (torch already spreads a forward over the cores).
        parallel = [console_script("torchrun"), "--nproc-per-node", str(cfg.gpus_per_node), "-m", "reolm"]
        stages.append(Stage("image features (corpus)",
                            [*(reolm_command() if cfg.cpu else parallel), "tables", "images",
                             "--vision", cfg.vision, "--corpus", str(shards)],
                            shards / "tables" / "images-*" / "table.json",
                            inputs=[Path(cfg.vision), shards / "manifest.json"]))
        # One process for every evaluated domain (their token tables are built by the first run that needs them).
        stages.append(Stage("image features (held-out and downstream domains)",
                            reolm_command("tables", "images", "--vision", cfg.vision, "--domain", *map(str, evaluated)),
                            evaluated[-1] / "image_features.npy", inputs=[Path(cfg.vision), *evaluated],
                            outputs=[d / "image_features.npy" for d in evaluated[:-1]]))
    cost = pretraining_cost(cfg)
    pretrain_run = runs / "pretrain"
    stages.append(_pretrain_stage(cfg, backbone, shards, pretrain_run, cost))
    stages.append(Stage("export the pre-trained model",
                        reolm_command("export", "checkpoint", str(pretrain_run), str(export)),
                        export / "model.safetensors", inputs=[pretrain_run / "checkpoints"]))
    if cfg.dev_category:
        stages.append(Stage(f"zero-shot on {cfg.dev_category} (held out of pre-training)",
                            python_command("launch/evaluate.py", "--domain", str(dev_dir), "--model", str(export),
                                           "--split", "test", "--no-progress",
                                           "--out", str(runs / "zeroshot" / f"{cfg.dev_category}.json")),
                            runs / "zeroshot" / f"{cfg.dev_category}.json", inputs=[dev_dir, export]))
    run_dirs: list[Path] = []
    for name, domain in downstream.items():
        stages.append(Stage(f"{name}: zero-shot Reo-LM (the export, no fine-tuning)", python_command(
            "launch/evaluate.py", "--domain", str(domain), "--model", str(export), "--split", "test", "--no-progress",
            "--out", str(runs / name / "reolm-zeroshot" / "metrics.json")),
            runs / name / "reolm-zeroshot" / "metrics.json", inputs=[domain, export]))
        run_dirs.append(runs / name / "reolm-zeroshot")
        finetune = ["--domain", str(domain), "--config", cfg.finetune_config]
        stages.append(Stage(f"{name}: fine-tune Reo-LM", python_command(
            "launch/finetune.py", *finetune, "--model", "reolm", "--init", str(export), "--out",
            str(runs / name / "reolm")), runs / name / "reolm" / "metrics.json", inputs=[domain, export]))
        run_dirs.append(runs / name / "reolm")
        if cfg.no_pretrain_ablation:
            stages.append(Stage(f"{name}: fine-tune Reo-LM without pre-training", python_command(
                "launch/finetune.py", *finetune, "--model", "reolm", "--backbone", str(backbone), "--out",
                str(runs / name / "reolm-nopretrain")), runs / name / "reolm-nopretrain" / "metrics.json",
                inputs=[domain, backbone]))
            run_dirs.append(runs / name / "reolm-nopretrain")
        for model in cfg.baselines:
            stages.append(Stage(f"{name}: {model}", python_command(
                "launch/finetune.py", "--domain", str(domain), "--config", cfg.baseline_config, "--model", model,
                "--out", str(runs / name / model)), runs / name / model / "metrics.json", inputs=[domain]))
            run_dirs.append(runs / name / model)
    results = work / "results"
    domain_dirs = [*pretrain_dirs, *evaluated]
    stages.append(Stage("dataset statistics (the paper's table)",
                        reolm_command("stats", *map(str, domain_dirs), "--paper-layout",
                                      "--out", str(results / "datasets.md"), "--json-out", str(results / "datasets.json")),
                        results / "datasets.md", inputs=domain_dirs, outputs=[results / "datasets.json"]))
    stages.append(Stage("report (Table 2 layout)",
                        reolm_command("report", *map(str, run_dirs), "--out", str(results / "table2.md"),
                                      "--plot", str(results / "table2.png"), "--json", str(results / "table2.json")),
                        results / "table2.md", inputs=[d / "metrics.json" for d in run_dirs], refresh=True))
    return stages


def _pretrain_stage(cfg: RecipeConfig, backbone: Path, shards: Path, run_dir: Path,
                    cost: dict[str, float]) -> Stage:
    """Pre-training on Slurm (``sbatch --wait``) or with the deepspeed launcher on this machine.

    The recipe owns ``run_dir``: the command passes ``--resume latest``, so running the recipe again
    after an interruption continues from the newest complete checkpoint instead of starting over.
    """
    args = ["--config", cfg.pretrain_config, f"model.backbone={backbone}", f"data.corpus={shards}",
            *cfg.pretrain_overrides, "--resume", "latest"]
    ranks = f"{cfg.nodes} x {cfg.gpus_per_node} {'CPU ranks' if cfg.cpu else 'GPUs'}"
    note = (f"{cost['steps']:,} steps x {cost['global_batch']:,} sequences (~{cost['tokens_per_sequence']:.0f} "
            f"tokens each): {cost['flops']:.2e} FLOPs = ~{math.ceil(cost['gpu_hours'])} GPU-hours at "
            f"{cfg.cost.mfu:.0%} MFU of {cfg.cost.gpu_peak_tflops:g} TFLOP/s, ~{cost['wall_hours']:.1f} h on "
            f"{ranks} (estimate: reolm/recipe.py CostModel)")
    done = run_dir / "checkpoints" / step_tag(int(cost["steps"]))
    inputs = [backbone, shards / "tables"]
    if cfg.pretrain_launcher == "deepspeed":
        return Stage("pre-train (deepspeed launcher)",
                     [*deepspeed_launcher(cfg.gpus_per_node), str(REPO_ROOT / "launch" / "pretrain.py"), *args,
                      f"run_dir={run_dir}"], done, inputs=inputs, note=note)
    env = {"RUN_DIR": str(run_dir)}
    if cfg.cpu:
        env["GPUS_PER_NODE"] = str(cfg.gpus_per_node)  # ranks per node: there is no GPU to count
    return Stage("pre-train (Slurm)",
                 ["sbatch", "--wait", "--nodes", str(cfg.nodes), "--gpus-per-node",
                  "0" if cfg.cpu else str(cfg.gpus_per_node),
                  "--output", str(Path(cfg.work_dir) / "slurm-pretrain-%j.out"), *cfg.sbatch_options,
                  "launch/slurm/pretrain.sbatch", *args],
                 done, env=env, inputs=inputs, note=note, before=functools.partial(refuse_if_job_active, run_dir))


def refuse_if_job_active(run_dir: Path) -> None:
    """Stop before submitting when the Slurm job that owns ``run_dir`` is still queued or running.

    An earlier invocation of the recipe that was killed leaves its ``sbatch --wait`` job behind;
    a second job would train in the same folder at the same time.
    """
    try:
        run_id = json.loads((run_dir / "owner.json").read_text()).get("run_id", "")
    except (OSError, ValueError):
        return
    if not run_id.startswith("slurm:"):
        return
    job = run_id.rsplit(":", 1)[-1]
    try:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return
    if state and state not in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                               "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
        raise SystemExit(f"pre-training job {job} of an earlier run of the recipe is still {state} in {run_dir}: "
                         f"wait for it to end (squeue -j {job}) or cancel it (scancel {job}), then run the same "
                         f"command again; it resumes from the newest checkpoint")


def print_results(cfg: RecipeConfig) -> None:
    """The dataset table and Table 2 the recipe wrote, as the last thing it prints."""
    results = Path(cfg.work_dir).resolve() / "results"
    for name in ("datasets.md", "table2.md"):
        print(f"\n{results / name}:\n{(results / name).read_text()}")
    print(f"done: {results}")


def load_recipe(files: list[str], overrides: list[str]) -> RecipeConfig:
    return load_config(RecipeConfig, files, overrides)
