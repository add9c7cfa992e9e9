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
bench/results/<record>.json (+ .md, .png) with the machine, stage timings and peak memory
(real_transfer_<cpu|gpu> for those budgets).

--budget cpu-real is the real-data quality benchmark (docs/transfer.md): the target is a real,
time-ordered domain (e.g. ../shared/data/office/Office2014), every user is evaluated, Reo-LM
fine-tunes a fixed number of validation rounds and keeps the best round, the backbone is
evaluated zero-shot with [CLS] and mean pooling (both recorded), and the text + ID variants are
added: transductive Reo-LM (reolm.item_id_embedding, from the backbone: reolm-nopretrain-id, and
from the pre-trained export: reolm-id) and SASRec whose item rows start from the item vectors of
the Reo-LM fine-tuned from the backbone (sasrec-textinit). It records
bench/results/real_quality_<target>.{json,md,png} plus the validation learning curves of every
Reo-LM run (NDCG@10 against optimiser step and wall time) in the JSON and in
real_quality_<target>_curves.png.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reolm.pipeline import (Stage, deepspeed_launcher, fingerprint, print_plan, python_command,  # noqa: E402
                            reolm_command, run_stages)

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
    record: str = ""           # bench/results/<record>.json; "{target}" is replaced by the target's name
    notes: list[str] = field(default_factory=list)
    # Zero-shot poolings evaluated (each into runs/plm-zeroshot-<pooling>); the report's zero-shot
    # column is `pooling`'s, the one the fine-tunes and pre-training use. () = the model default only.
    zero_shot_poolings: tuple[str, ...] = ()
    pooling: str = "cls"
    variants: bool = False     # add reolm-nopretrain-id, reolm-id and sasrec-textinit (docs/transfer.md)
    cold_items: float = 0.0    # > 0: also the target's cold-item split with this fraction of its items

    def pooling_override(self, section: str = "reolm.model") -> list[str]:
        """``SECTION.pooling=P`` for every Reo-LM run when the budget fixes a pooling, else nothing."""
        return [f"{section}.pooling={self.pooling}"] if self.zero_shot_poolings else []

    def record_name(self, target: str) -> str:
        return self.record.replace("{target}", target)


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
    "cpu-real": TransferBudget(
        "cpu-real", "launch/configs/pretrain/real-cpu.yaml", "launch/configs/finetune/real-cpu.yaml",
        eval_users=0, nproc=2, record="real_quality_{target}", zero_shot_poolings=("cls", "mean"),
        pooling="cls", variants=True, cold_items=0.2,
        notes=["the real-data quality benchmark: a real ordered target, all users, Reo-LM for a fixed number of "
               "validation rounds (5 + 4 of 150 steps, the best on validation kept), the text + ID variants; "
               "about 4 hours of 2 CPU cores on Office2014 (each stage's time is recorded; --only splits the "
               "stages into lanes)"]),
}


def _world_size(budget: TransferBudget) -> int:
    if budget.nproc:
        return budget.nproc
    import torch
    return torch.cuda.device_count() or 2


def _data_stages(run_dir: Path, sources: list[Path], target: Path, backbone: Path
                 ) -> tuple[list[Stage], list[Path], Path]:
    """Import every domain, shard the sources, token tables of the corpus and the target."""
    domains, shards = run_dir / "domains", run_dir / "shards"
    stages, imported = [], []
    for src in [*sources, target]:
        out = domains / src.name
        stages.append(Stage(f"import {src.name}", reolm_command("import", "recformer", str(src), "--name", src.name,
                                                               "--out", str(out)),
                            out / "domain.json", inputs=[src]))
        imported.append(out)
    source_dirs, evaluated = imported[:-1], imported[-1]
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
    ]
    return stages, source_dirs, evaluated


def _zero_shot_stage(label: str, domain: Path, backbone: Path, out: Path, overrides: list[str]) -> Stage:
    return Stage(f"zero-shot: the backbone alone{label}",
                 python_command("launch/evaluate.py", "--domain", str(domain), "--model", str(backbone),
                                "--split", "test", "--no-progress", "--out", str(out / "metrics.json"), *overrides),
                 out / "metrics.json", inputs=[domain, backbone])


def _settings_fingerprint(config: Path, model: str, args: list[str], overrides: list[str]) -> str:
    """What decides a fine-tune's result besides its input paths: the sections of the shared YAML
    that ``--model`` reads (so a change to Reo-LM's section leaves the baselines' runs valid) and
    the overrides of those sections, and its flags (paths left out, so a moved run directory keeps
    its stages)."""
    import yaml
    sections = ("train", "eval", model)
    doc = yaml.safe_load(config.read_text()) or {}
    return fingerprint(model, [a for a in args if a.startswith("--")],
                       [o for o in overrides if o.split(".", 1)[0] in sections],
                       {key: doc.get(key) for key in sections})


def _finetune_stage(label: str, domain: Path, config: Path, model: str, out: Path, args: list[str],
                    overrides: list[str], inputs: list[Path]) -> Stage:
    return Stage(label, python_command("launch/finetune.py", "--domain", str(domain), "--config", str(config),
                                       "--model", model, *args, "--out", str(out), *overrides),
                 out / "metrics.json", inputs=[domain, *inputs],
                 fingerprint=_settings_fingerprint(config, model, args, overrides))


def transfer_stages(run_dir: Path, sources: list[Path], target: Path, backbone: Path, budget: TransferBudget,
                    pretrain_overrides: list[str] = (), finetune_overrides: list[str] = ()
                    ) -> tuple[list[Stage], dict[str, Path]]:
    """Every stage of the experiment, and the run directory of each compared model (the keys of
    runs on the cold-item split start with ``cold:``).

    Order: data, zero-shot, the ID baselines, then the Reo-LM runs that start from the backbone
    (with the text + ID variants and the cold-item split), and last pre-training and the runs that
    start from its export: a run stopped early has the results that cost least."""
    shards, pretrain_dir, export_dir, runs = (run_dir / "shards", run_dir / "pretrain", run_dir / "pretrained",
                                              run_dir / "runs")
    stages, _, evaluated = _data_stages(run_dir, sources, target, backbone)
    # Every model on the target is validated and tested on the same users: the budget's seeded
    # sample (eval.max_users / subset_seed) or all of them.
    subset = [f"eval.max_users={budget.eval_users}", f"eval.subset_seed={budget.eval_seed}"]
    # The budget's pooling is that of every Reo-LM run (pre-training, hence the export, and the
    # fine-tune from the backbone), so its zero-shot column is the one those runs start from.
    finetune_overrides = [*subset, *budget.pooling_override(), *finetune_overrides]
    pretrain_overrides = [*budget.pooling_override("model"), *pretrain_overrides]
    config = REPO / budget.finetune_config
    models = {"reolm": runs / "reolm", "reolm-nopretrain": runs / "reolm-nopretrain",
              **{m: runs / m for m in budget.baselines}}
    for name in budget.zero_shot_poolings or ("",):
        folder = runs / (f"plm-zeroshot-{name}" if name else "plm-zeroshot")
        if name == (budget.pooling if budget.zero_shot_poolings else ""):
            models["zero-shot"] = folder  # the report's column; every pooling's metrics are recorded
        stages.append(_zero_shot_stage(f" ({name} pooling)" if name else "", evaluated, backbone, folder,
                                       [*subset, *([f"reolm.model.pooling={name}"] if name else [])]))
    for model in budget.baselines:
        stages.append(_finetune_stage(f"baseline {model}", evaluated, config, model, models[model], [],
                                      finetune_overrides, []))
    id_part = ["reolm.item_id_embedding=true"]
    from_backbone = ["--backbone", str(backbone)]
    stages.append(_finetune_stage("fine-tune Reo-LM from the backbone alone", evaluated, config, "reolm",
                                  models["reolm-nopretrain"], from_backbone, finetune_overrides, [backbone]))
    if budget.variants:
        # From the backbone first: they need no pre-training, the costliest and last stage to finish.
        models["reolm-nopretrain-id"] = runs / "reolm-nopretrain-id"
        models["sasrec-textinit"] = runs / "sasrec-textinit"
        stages += [
            _finetune_stage("fine-tune transductive Reo-LM (content + ID) from the backbone", evaluated, config,
                            "reolm", models["reolm-nopretrain-id"], from_backbone, [*id_part, *finetune_overrides],
                            [backbone]),
            _finetune_stage("SASRec with item rows from the fine-tuned Reo-LM's item vectors", evaluated, config,
                            "sasrec", models["sasrec-textinit"], ["--item-init", str(models["reolm-nopretrain"])],
                            finetune_overrides, [models["reolm-nopretrain"] / "metrics.json"]),
        ]
    if budget.cold_items:
        stages += _cold_item_stages(evaluated, run_dir, backbone, budget, config, models, finetune_overrides, subset)
    stages += [
        Stage("pre-train on the sources (DeepSpeed)",
              [*deepspeed_launcher(_world_size(budget)), str(REPO / "launch" / "pretrain.py"),
               "--config", str(REPO / budget.pretrain_config), f"data.corpus={shards}", f"model.backbone={backbone}",
               f"run_dir={pretrain_dir}", "ckpt.resume=latest", *pretrain_overrides],
              export_dir / "model.safetensors",  # resumes from its last checkpoint if interrupted
              inputs=[backbone, shards / "tables"], outputs=[pretrain_dir]),
        Stage("export the pre-trained model", reolm_command("export", "checkpoint", str(pretrain_dir),
                                                            str(export_dir)),
              export_dir / "model.safetensors", inputs=[pretrain_dir]),
        _finetune_stage("fine-tune Reo-LM from the pre-trained export", evaluated, config, "reolm", models["reolm"],
                        ["--init", str(export_dir)], finetune_overrides, [export_dir]),
    ]
    if budget.variants:
        models["reolm-id"] = runs / "reolm-id"
        stages.append(_finetune_stage("fine-tune transductive Reo-LM (content + ID) from the pre-trained export",
                                      evaluated, config, "reolm", models["reolm-id"], ["--init", str(export_dir)],
                                      [*id_part, *finetune_overrides], [export_dir]))
    stages.append(Stage("report", reolm_command("report", *(str(d) for d in models.values()),
                                                "--out", str(run_dir / "results.md"), "--plot",
                                                str(run_dir / "results.png"), "--json", str(run_dir / "results.json")),
                        run_dir / "results.md", inputs=[d / "metrics.json" for d in models.values()], refresh=True))
    return stages, models


def _cold_item_stages(evaluated: Path, run_dir: Path, backbone: Path, budget: TransferBudget, config: Path,
                      models: dict[str, Path], finetune_overrides: list[str], subset: list[str]) -> list[Stage]:
    """The target's cold-item split (``reolm split cold-items``: a fraction of its items never
    trained on): zero-shot, popularity, SASRec and the transductive Reo-LM from the backbone, whose
    never-trained items keep a zero ID part and are scored from content alone. Adds the runs to
    ``models``."""
    cold, runs = run_dir / "domains" / f"{evaluated.name}-cold", run_dir / "runs-cold"
    stages = [Stage(f"cold-item split ({budget.cold_items:.0%} of the target's items)",
                    reolm_command("split", "cold-items", str(evaluated), "--fraction", str(budget.cold_items),
                                  "--seed", "0", "--out", str(cold)),
                    cold / "domain.json", inputs=[evaluated])]
    zero_shot = runs / "plm-zeroshot"
    models["cold:zero-shot"] = zero_shot
    stages.append(_zero_shot_stage(" (cold-item split)", cold, backbone, zero_shot,
                                   [*subset, *budget.pooling_override()]))
    for model in ("pop", "sasrec"):
        models[f"cold:{model}"] = runs / model
        stages.append(_finetune_stage(f"cold items: {model}", cold, config, model, runs / model, [],
                                      finetune_overrides, []))
    models["cold:reolm-nopretrain-id"] = runs / "reolm-nopretrain-id"
    stages.append(_finetune_stage("cold items: transductive Reo-LM from the backbone", cold, config, "reolm",
                                  runs / "reolm-nopretrain-id", ["--backbone", str(backbone)],
                                  ["reolm.item_id_embedding=true", *finetune_overrides], [backbone]))
    return stages


def _metrics_summary(path: Path) -> dict:
    doc = json.loads(path.read_text())
    keep = ("model", "num_users", "num_items", "best_epoch", "best_stage", "train_time_s", "epochs_run")
    buckets = {b["bucket"]: {"users": b["users"], "NDCG@10": round(b["metrics"]["NDCG@10"], 5)}
               for b in doc.get("by_item_frequency", [])}  # how often the test target occurs in training
    return {**{k: doc[k] for k in keep if k in doc},
            "metrics": {k: round(v, 5) for k, v in doc["metrics"].items() if k in ("NDCG@10", "Recall@10", "MRR")},
            **({"by_target_frequency": buckets} if buckets else {})}


def _domain_counts(folder: Path) -> dict:
    return json.loads((folder / "domain.json").read_text())["counts"]


def learning_curve(log_path: Path, metric: str = "NDCG@10") -> list[dict]:
    """Validation points of one run's log.jsonl: the stage, its epoch, the optimiser steps taken so
    far (summed over the rounds' ``steps``, across stages) and the wall time."""
    points, steps = [], 0
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        steps += record.get("steps", 0)
        if "val" in record and metric in record["val"]:
            points.append({"stage": record["stage"], "epoch": record["epoch"], "step": steps,
                           "time_s": record["time_s"], metric: round(record["val"][metric], 5)})
    return points


def plot_curves(curves: dict[str, list[dict]], path: Path, metric: str = "NDCG@10") -> None:
    """Validation ``metric`` of each run against optimiser steps and against wall time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in curves.items():
        if not points:
            continue
        values = [p[metric] for p in points]
        by_step.plot([p["step"] for p in points], values, marker="o", label=name)
        by_time.plot([p["time_s"] / 60 for p in points], values, marker="o", label=name)
    by_step.set_xlabel("optimiser steps (stage 1 then stage 2)")
    by_time.set_xlabel("wall time (min)")
    for ax in (by_step, by_time):
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
    if any(curves.values()):
        by_step.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(run_dir: Path, models: dict[str, Path]) -> Path | None:
    """RUN/results (the report stage's, once every run has finished) or, while some have not,
    RUN/results-partial: ``reolm report`` over the finished runs; None before any has finished.
    Returned without suffix: ``.json``, ``.md`` and ``.png`` sit beside it."""
    finished = [d for d in models.values() if (d / "metrics.json").is_file()]
    if len(finished) == len(models) and (run_dir / "results.json").is_file():
        return run_dir / "results"
    if not finished:
        return None
    partial = run_dir / "results-partial"
    subprocess.run(reolm_command("report", *map(str, finished), "--out", f"{partial}.md", "--plot",
                                 f"{partial}.png", "--json", f"{partial}.json"), check=True, cwd=REPO)
    return partial


def record_run(budget: TransferBudget, run_dir: Path, models: dict[str, Path], timings: dict,
               inputs: dict[str, Path]) -> Path:
    """bench/results/<record>.json (+ the markdown table and the PNG) from what the run holds: a run
    that has not finished is null in ``runs`` and named in ``unfinished``, and the table is then
    that of the finished runs."""
    sys.path.insert(0, str(REPO / "bench"))
    from common import RESULTS, machine, write_result
    result = {
        "benchmark": "real_transfer", "budget": asdict(budget), "machine": machine(),
        "inputs": {k: {"path": str(v), "counts": _domain_counts(run_dir / "domains" / v.name)} for k, v in inputs.items()
                   if k != "backbone"} | {"backbone": str(inputs["backbone"])},
        "wall_s": round(sum(t["wall_s"] for t in timings.values() if isinstance(t, dict)), 1),
        # A stage run by hand and moved in may lack a measured peak (null in timings.json).
        "peak_rss_gib": max((t["peak_rss_gib"] for t in timings.values()
                             if isinstance(t, dict) and t.get("peak_rss_gib") is not None), default=None),
        "stages": timings,
        # A run that has not finished (yet) is recorded as null rather than left out.
        "runs": {name: _metrics_summary(d / "metrics.json") if (d / "metrics.json").is_file() else None
                 for name, d in models.items()},
    }
    record = budget.record_name(inputs["target"].name)
    if budget.zero_shot_poolings:
        result["zero_shot_poolings"] = {
            pooling: _metrics_summary(folder / "metrics.json") if (folder / "metrics.json").is_file() else None
            for pooling in budget.zero_shot_poolings for folder in [run_dir / "runs" / f"plm-zeroshot-{pooling}"]}
    curves = {name: learning_curve(d / "log.jsonl") for name, d in models.items() if (d / "log.jsonl").is_file()}
    result["learning_curves"] = curves
    report = _report(run_dir, models)
    if report is not None:
        result["table"] = json.loads(report.with_suffix(".json").read_text())
        result["table_markdown"] = report.with_suffix(".md").read_text()
        if report.name != "results":
            result["unfinished"] = sorted(n for n, d in models.items() if not (d / "metrics.json").is_file())
    path = write_result(f"{record}.json", result)
    for suffix in ("md", "png"):
        if report is not None and report.with_suffix(f".{suffix}").is_file():
            shutil.copyfile(report.with_suffix(f".{suffix}"), RESULTS / f"{record}.{suffix}")
    plot_curves({name: points for name, points in curves.items() if name.startswith("reolm")},
                RESULTS / f"{record}_curves.png")
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
    parser.add_argument("--only", metavar="REGEX",
                        help="run only the stages whose name matches (e.g. a second lane beside a running "
                             "command: --only 'baseline|popularity'); the report stage needs every run finished")
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
        print_plan(stages, run_dir=run_dir)
        return 0
    inputs = {**{f"pretrain:{p.name}": p for p in sources}, "target": target, "backbone": backbone}
    every_stage = stages
    if args.record_only:
        timings = json.loads((run_dir / "timings.json").read_text())
        print(f"recorded {record_run(budget, run_dir, models, _finished(timings, every_stage), inputs)}")
        return 0
    start = time.perf_counter()
    if args.only:
        stages = [s for s in stages if re.search(args.only, s.name)]
    timings = run_stages(run_dir, stages, resume_hint="fix the cause and run the same command again to resume")
    wall = time.perf_counter() - start
    print(f"\nfinished in {wall / 60:.1f} min; results in {run_dir}\n")
    if (run_dir / "results.md").is_file():  # not with --only before the report stage has run
        print((run_dir / "results.md").read_text())
    if args.record:
        print(f"recorded {record_run(budget, run_dir, models, _finished(timings, every_stage), inputs)}")
    return 0


def _finished(timings: dict, stages: list[Stage]) -> dict:
    """The timings of the stages whose output is there now (a run moved aside to be redone keeps
    its old entry in timings.json until it runs again)."""
    return {s.name: timings[s.name] for s in stages if s.name in timings and s.is_done()}


if __name__ == "__main__":
    raise SystemExit(main())
