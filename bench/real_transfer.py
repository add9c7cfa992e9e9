#!/usr/bin/env python
"""Real-data transfer experiment: pre-train on real source domains, compare everything on a target.

    python bench/real_transfer.py --pretrain D1 D2 D3 --target DT --backbone HF_DIR \
        [--budget cpu-small|gpu] [--run-dir DIR] [--dry-run]

Inputs are Recformer-layout folders (train/val/test/smap/umap/meta_data.json) and a local HF
checkpoint. Every stage is an ordinary user command, run in order and skipped once done (so the
same command resumes):

  reolm import recformer (each domain) -> reolm shard (sources) -> reolm tables tokens -> deepspeed launch/pretrain.py (source domains)
  -> reolm export checkpoint -> on the target: launch/evaluate.py zero-shot of the backbone,
  launch/finetune.py Reo-LM from the pre-trained export and from the backbone alone, and the ID
  baselines (SASRec, GRU4Rec, BERT4Rec, popularity) -> reolm report (table + PNG).

Every model is trained on the same training sequences and validated and tested on the same
users (the whole target, or the budget's seeded sample of them) by full ranking of all items.
The budget fixes the configs (launch/configs/{pretrain,finetune}/transfer-<budget>.yaml), the
number of evaluation users and of pre-training ranks; docs/transfer.md describes both budgets
and the recorded run. Results: RUN_DIR/results.{md,png,json}; with --record, also
bench/results/real_transfer_<cpu|gpu>.json (+ .md, .png) with the machine, stage timings and
peak memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reolm.pipeline import (Stage, deepspeed_launcher, print_plan, python_command, reolm_command,  # noqa: E402
                            run_stages)

BASELINES = ("sasrec", "gru4rec", "bert4rec", "pop")


@dataclass(frozen=True)
class TransferBudget:
    """How much compute one run spends: configs, evaluation users, pre-training ranks."""

    name: str
    pretrain_config: str       # PretrainConfig YAML (paths are filled in by this script)
    finetune_config: str       # FinetuneConfig YAML shared by every model on the target
    eval_users: int            # target users validated and tested (eval.max_users, a seeded sample); 0 = all
    eval_seed: int = 0
    nproc: int = 0             # pre-training ranks; 0 = every GPU, or 2 gloo ranks on CPU
    baselines: tuple[str, ...] = BASELINES
    record: str = ""           # bench/results/<record>.json
    notes: list[str] = field(default_factory=list)


BUDGETS = {
    "cpu-small": TransferBudget(
        "cpu-small", "launch/configs/pretrain/transfer-cpu-small.yaml",
        "launch/configs/finetune/transfer-cpu-small.yaml", eval_users=300, nproc=2, record="real_transfer_cpu",
        notes=["about 40 minutes on 2 shared CPU cores, under 6 GB RSS; a smoke-sized experiment: the "
               "Reo-LM runs see ~1% of an epoch, so their numbers are a floor, not the method's"]),
    "gpu": TransferBudget(
        "gpu", "launch/configs/pretrain/transfer-gpu.yaml", "launch/configs/finetune/transfer-gpu.yaml",
        eval_users=0, record="real_transfer_gpu",
        notes=["the reference's fine-tuning recipe, every user evaluated; pre-training on all GPUs"]),
}


def _world_size(budget: TransferBudget) -> int:
    if budget.nproc:
        return budget.nproc
    import torch
    return torch.cuda.device_count() or 2


def transfer_stages(run_dir: Path, sources: list[Path], target: Path, backbone: Path, budget: TransferBudget,
                    pretrain_overrides: list[str] = (), finetune_overrides: list[str] = ()
                    ) -> tuple[list[Stage], dict[str, Path]]:
    """Every stage of the experiment, and the run directory of each compared model."""
    domains, shards = run_dir / "domains", run_dir / "shards"
    pretrain_dir, export_dir, runs = run_dir / "pretrain", run_dir / "pretrained", run_dir / "runs"
    stages: list[Stage] = []
    imported = []
    for src in [*sources, target]:
        out = domains / src.name
        stages.append(Stage(f"import {src.name}", reolm_command("import", "recformer", str(src), "--name", src.name,
                                                               "--out", str(out)),
                            out / "domain.json", inputs=[src]))
        imported.append(out)
    source_dirs, evaluated = imported[:-1], imported[-1]
    # Every model on the target is validated and tested on the same users: the budget's seeded
    # sample (eval.max_users / subset_seed) or all of them.
    subset = [f"eval.max_users={budget.eval_users}", f"eval.subset_seed={budget.eval_seed}"]
    finetune_overrides = [*subset, *finetune_overrides]
    stages += [
        Stage("shard the source domains", reolm_command("shard", "--out", str(shards), "--quiet",
                                                        *map(str, source_dirs)),
              shards / "manifest.json", inputs=list(source_dirs)),
        Stage("token table (sources)", reolm_command("tables", "tokens", "--tokenizer", str(backbone), "--corpus",
                                                     str(shards), "--quiet"),
              shards / "tables" / "tokens-*" / "table.json", inputs=[backbone, shards / "manifest.json"]),
        Stage("token table (target)", reolm_command("tables", "tokens", "--tokenizer", str(backbone), "--domain",
                                                    str(evaluated), "--quiet"),
              evaluated / "tables" / "tokens-*" / "table.json", inputs=[backbone, evaluated]),
        Stage("pre-train on the sources (DeepSpeed)",
              [*deepspeed_launcher(_world_size(budget)), str(REPO / "launch" / "pretrain.py"),
               "--config", str(REPO / budget.pretrain_config), f"data.corpus={shards}", f"model.backbone={backbone}",
               f"run_dir={pretrain_dir}", "ckpt.resume=latest", *pretrain_overrides],
              export_dir / "model.safetensors",  # resumes from its last checkpoint if interrupted
              inputs=[backbone, shards / "tables"], outputs=[pretrain_dir]),
        Stage("export the pre-trained model", reolm_command("export", "checkpoint", str(pretrain_dir),
                                                            str(export_dir)),
              export_dir / "model.safetensors", inputs=[pretrain_dir]),
    ]
    ft = ["--domain", str(evaluated), "--config", str(REPO / budget.finetune_config)]
    models = {"zero-shot": runs / "plm-zeroshot", "reolm": runs / "reolm", "reolm-nopretrain": runs / "reolm-nopretrain",
              **{m: runs / m for m in budget.baselines}}
    stages.append(Stage("zero-shot: the backbone alone",
                        python_command("launch/evaluate.py", "--domain", str(evaluated), "--model", str(backbone),
                                       "--split", "test", "--no-progress", "--out",
                                       str(models["zero-shot"] / "metrics.json"), *subset),
                        models["zero-shot"] / "metrics.json", inputs=[evaluated, backbone]))
    stages.append(Stage("fine-tune Reo-LM from the pre-trained export",
                        python_command("launch/finetune.py", *ft, "--model", "reolm", "--init", str(export_dir),
                                       "--out", str(models["reolm"]), *finetune_overrides),
                        models["reolm"] / "metrics.json", inputs=[evaluated, export_dir]))
    stages.append(Stage("fine-tune Reo-LM from the backbone alone",
                        python_command("launch/finetune.py", *ft, "--model", "reolm", "--backbone", str(backbone),
                                       "--out", str(models["reolm-nopretrain"]), *finetune_overrides),
                        models["reolm-nopretrain"] / "metrics.json", inputs=[evaluated, backbone]))
    for model in budget.baselines:
        stages.append(Stage(f"baseline {model}", python_command("launch/finetune.py", *ft, "--model", model,
                                                                "--out", str(models[model]), *finetune_overrides),
                            models[model] / "metrics.json", inputs=[evaluated]))
    stages.append(Stage("report", reolm_command("report", *(str(d) for d in models.values()),
                                                "--out", str(run_dir / "results.md"), "--plot",
                                                str(run_dir / "results.png"), "--json", str(run_dir / "results.json")),
                        run_dir / "results.md", inputs=[d / "metrics.json" for d in models.values()]))
    return stages, models


def _metrics_summary(path: Path) -> dict:
    doc = json.loads(path.read_text())
    keep = ("model", "num_users", "num_items", "best_epoch", "best_stage", "train_time_s", "epochs_run")
    return {**{k: doc[k] for k in keep if k in doc},
            "metrics": {k: round(v, 5) for k, v in doc["metrics"].items() if k in ("NDCG@10", "Recall@10", "MRR")}}


def _domain_counts(folder: Path) -> dict:
    return json.loads((folder / "domain.json").read_text())["counts"]


def record_run(budget: TransferBudget, run_dir: Path, models: dict[str, Path], timings: dict,
               inputs: dict[str, Path]) -> Path:
    """bench/results/<record>.json (+ the markdown table and the PNG) from a finished run."""
    sys.path.insert(0, str(REPO / "bench"))
    from common import RESULTS, machine, write_result
    result = {
        "benchmark": "real_transfer", "budget": asdict(budget), "machine": machine(),
        "inputs": {k: {"path": str(v), "counts": _domain_counts(run_dir / "domains" / v.name)} for k, v in inputs.items()
                   if k != "backbone"} | {"backbone": str(inputs["backbone"])},
        "wall_s": round(sum(t["wall_s"] for t in timings.values() if isinstance(t, dict)), 1),
        "peak_rss_gib": max((t["peak_rss_gib"] for t in timings.values() if isinstance(t, dict)), default=None),
        "stages": timings,
        # A run that has not finished (yet) is recorded as null rather than left out.
        "runs": {name: _metrics_summary(d / "metrics.json") if (d / "metrics.json").is_file() else None
                 for name, d in models.items()},
    }
    if (run_dir / "results.json").is_file():
        result["table"] = json.loads((run_dir / "results.json").read_text())
        result["table_markdown"] = (run_dir / "results.md").read_text()
    path = write_result(f"{budget.record}.json", result)
    for suffix in ("md", "png"):
        if (run_dir / f"results.{suffix}").is_file():
            shutil.copyfile(run_dir / f"results.{suffix}", RESULTS / f"{budget.record}.{suffix}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain", nargs="+", required=True, metavar="DIR", help="source domains (Recformer layout)")
    parser.add_argument("--target", required=True, metavar="DIR", help="target domain (Recformer layout)")
    parser.add_argument("--backbone", required=True, metavar="HF_DIR", help="local HF checkpoint (BERT/RoBERTa)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu-small")
    parser.add_argument("--run-dir", default="runs/real_transfer", help="where everything is written")
    parser.add_argument("--pretrain-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra launch/pretrain.py override on top of the budget's config (repeatable)")
    parser.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra launch/finetune.py override for every model on the target (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print every command with its inputs; run nothing")
    parser.add_argument("--record", action="store_true",
                        help="write bench/results/real_transfer_<cpu|gpu>.{json,md,png} when the run finishes")
    parser.add_argument("--record-only", action="store_true",
                        help="run nothing: record what RUN_DIR holds now (unfinished runs as null)")
    args = parser.parse_args(argv)
    budget = BUDGETS[args.budget]
    sources = [Path(p).resolve() for p in args.pretrain]
    target, backbone = Path(args.target).resolve(), Path(args.backbone).resolve()
    names = [p.name for p in [*sources, target]]
    if len(set(names)) != len(names):
        parser.error(f"domain folder names must differ (they name the domains): {names}")
    run_dir = Path(args.run_dir).resolve()
    stages, models = transfer_stages(run_dir, sources, target, backbone, budget, args.pretrain_override,
                                     args.finetune_override)
    if args.dry_run:
        print(f"budget {budget.name}: {'; '.join(budget.notes)}")
        print_plan(stages)
        return 0
    inputs = {**{f"pretrain:{p.name}": p for p in sources}, "target": target, "backbone": backbone}
    if args.record_only:
        timings = json.loads((run_dir / "timings.json").read_text())
        print(f"recorded {record_run(budget, run_dir, models, timings, inputs)}")
        return 0
    start = time.perf_counter()
    timings = run_stages(run_dir, stages, resume_hint="fix the cause and run the same command again to resume")
    wall = time.perf_counter() - start
    print(f"\nfinished in {wall / 60:.1f} min; results in {run_dir}\n")
    print((run_dir / "results.md").read_text())
    if args.record:
        print(f"recorded {record_run(budget, run_dir, models, timings, inputs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
