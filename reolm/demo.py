"""The end-to-end demo behind ``make demo``: every stage of the mission, on embedded data.

Each stage is one ordinary user command (the same ones the README documents),
run as a subprocess with an argument list. A stage whose outputs already exist
is skipped, so an interrupted demo resumes where it stopped; ``--fresh`` starts
over. Stage timings go to ``RUN_DIR/timings.json``; the results table is printed
last.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import torch

from reolm.pipeline import Stage, deepspeed_launcher, python_command, reolm_command, run_stages

__all__ = ["Stage", "demo_stages", "run_demo"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_PRESET = "demo"
#: share of the held-out domain's items made cold (never in training) for the cold-start setting
COLD_FRACTION = 0.2


_reolm = reolm_command


def _world_size() -> int:
    """All GPUs when there are some; otherwise two CPU ranks (gloo), as CI does."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


_pretrain_launcher = deepspeed_launcher


def _domains(run_dir: Path, role: str) -> list[Path]:
    from reolm.data.synth import PRESETS
    return [run_dir / "data" / d.name for d in PRESETS[DEMO_PRESET].domains if d.role == role]


def settings(run_dir: Path) -> dict[str, tuple[Path, Path]]:
    """The demo's two settings of its held-out domain: name -> (domain folder, folder of its runs).
    The cold-item split has 20% of the domain's items never trained on."""
    (downstream,) = _domains(run_dir, "downstream")
    return {"warm": (downstream, run_dir / "runs"),
            "cold items": (downstream.with_name(f"{downstream.name}-cold"), run_dir / "runs-cold")}


def demo_stages(run_dir: Path, seed: int = 0, nproc: int | None = None, vocab_size: int = 8192) -> list[Stage]:
    data, shards = run_dir / "data", run_dir / "shards"
    tok, backbone, vision = run_dir / "tokenizer", run_dir / "backbone", run_dir / "vision"
    pretrain_dir, export_dir = run_dir / "pretrain", run_dir / "pretrained"
    sources = _domains(run_dir, "pretrain")
    (downstream, runs), (cold, cold_runs) = settings(run_dir).values()
    nproc = nproc or _world_size()

    def ft(domain: Path) -> list[str]:
        return python_command("launch/finetune.py", "--domain", str(domain),
                              "--config", str(REPO_ROOT / "launch" / "configs" / "finetune" / "demo.yaml"))

    def zero_shot(domain: Path, out: Path) -> list[str]:
        return python_command("launch/evaluate.py", "--domain", str(domain), "--model", str(export_dir),
                              "--split", "test", "--no-progress", "--out", str(out / "metrics.json"))

    def setting_stages(prefix: str, domain: Path, runs: Path, nopretrain: bool) -> list[Stage]:
        """Every compared model on one setting of the held-out domain (warm, or its cold-item split)."""
        def run(label: str, name: str, cmd: list[str], inputs: Sequence[Path] = ()) -> Stage:
            return Stage(prefix + label, cmd, runs / name / "metrics.json", inputs=[domain, *inputs])

        def fine_tune(name: str, *args: str) -> list[str]:
            return [*ft(domain), *args, "--out", str(runs / name)]

        return [
            run("fine-tune Reo-LM", "reolm", fine_tune("reolm", "--model", "reolm", "--init", str(export_dir))),
            run("zero-shot Reo-LM (pre-trained export)", "reolm-zeroshot", zero_shot(domain, runs / "reolm-zeroshot")),
            *([run("fine-tune without pre-training", "reolm-nopretrain",
                   fine_tune("reolm-nopretrain", "--model", "reolm", "--backbone", str(backbone)))] if nopretrain else []),
            run("SASRec", "sasrec", fine_tune("sasrec", "--model", "sasrec")),
            # The better of the two text + ID variants here (bench/results/demo_variants.json): SASRec
            # whose item rows start from the fine-tuned Reo-LM's item vectors.
            run("SASRec, item rows from Reo-LM's item vectors", "sasrec-textinit",
                fine_tune("sasrec-textinit", "--model", "sasrec", "--item-init", str(runs / "reolm")),
                inputs=[runs / "reolm" / "metrics.json"]),
            run("popularity", "pop", fine_tune("pop", "--model", "pop")),
        ]

    warm = setting_stages("", downstream, runs, nopretrain=True)
    cold_items = setting_stages("cold items: ", cold, cold_runs, nopretrain=False)
    report_runs = [str(stage.done_marker.parent) for stage in warm + cold_items]  # each run's folder
    return [
        Stage("synthesise corpus", _reolm("synth", "--preset", DEMO_PRESET, "--out", str(data), "--seed", str(seed)),
              downstream / "domain.json"),
        Stage("write shards", _reolm("shard", "--out", str(shards), "--seed", str(seed), *map(str, sources)),
              shards / "manifest.json"),
        Stage("train tokenizer", _reolm("tokenizer", "train", "--out", str(tok), "--kind", "words",
                                        "--vocab-size", str(vocab_size), "--quiet", "--domain", *map(str, sources + [downstream])),
              tok / "tokenizer.json"),
        Stage("init backbone", _reolm("init", "backbone", "--tokenizer", str(tok), "--out", str(backbone),
                                      "--size", "mini", "--max-positions", "512"),
              backbone / "config.json"),
        Stage("init vision model", _reolm("init", "vision", "--out", str(vision)), vision / "config.json"),
        Stage("token table (corpus)", _reolm("tables", "tokens", "--tokenizer", str(backbone), "--corpus", str(shards)),
              shards / "tables" / "tokens-*" / "table.json"),
        Stage("token table (downstream)", _reolm("tables", "tokens", "--tokenizer", str(backbone),
                                                 "--domain", str(downstream)),
              downstream / "tables" / "tokens-*" / "table.json"),
        Stage("image features (corpus)", _reolm("tables", "images", "--vision", str(vision), "--corpus", str(shards)),
              shards / "tables" / "images-*" / "table.json"),
        Stage("image features (downstream)", _reolm("tables", "images", "--vision", str(vision),
                                                    "--domain", str(downstream)),
              downstream / "image_features.npy"),
        Stage("pre-train (DeepSpeed)",
              [*_pretrain_launcher(nproc), str(REPO_ROOT / "launch" / "pretrain.py"),
               "--config", str(REPO_ROOT / "launch" / "configs" / "pretrain" / "demo.yaml"),
               f"data.corpus={shards}", f"model.backbone={backbone}", f"run_dir={pretrain_dir}", "ckpt.resume=latest"],
              export_dir / "model.safetensors"),  # resumes from its last checkpoint if interrupted
        Stage("export pre-trained model", _reolm("export", "checkpoint", str(pretrain_dir), str(export_dir)),
              export_dir / "model.safetensors"),
        Stage("cold-item split (20% of the held-out items)",
              _reolm("split", "cold-items", str(downstream), "--fraction", str(COLD_FRACTION), "--seed", str(seed),
                     "--out", str(cold)),
              cold / "domain.json"),
        *warm,
        *cold_items,
        Stage("report", _reolm("report", *report_runs, "--out", str(run_dir / "results.md"),
                               "--plot", str(run_dir / "results.png"), "--json", str(run_dir / "results.json")),
              run_dir / "results.md", inputs=[stage.done_marker for stage in warm + cold_items], refresh=True),
    ]


def run_demo(run_dir: Path, stages: Sequence[Stage], fresh: bool = False) -> dict[str, dict[str, float]]:
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    return run_stages(run_dir, stages, resume_hint="fix the cause and run `make demo` again to resume from this stage")
