"""Which text + ID variant the demo shows: both, on a finished `make demo` run.

The demo (reolm/demo.py) carries one of the two text + ID variants as a row, to keep its time
down: ``sasrec-textinit``, SASRec whose item rows start from the fine-tuned Reo-LM's item vectors
(``--model sasrec --item-init RUN``). This benchmark adds the other on the demo's held-out
domain, warm and on its cold-item split, with the demo's fine-tuning config:

* ``reolm-id``: transductive Reo-LM from the pre-trained export (``reolm.item_id_embedding=true``):
  each item's vector is its content vector plus a learned, zero-initialised ID row;

and compares it with the demo's SASRec, Reo-LM and text-initialised SASRec runs.

    python bench/demo_variants.py --demo runs/demo      # after `make demo`

Each run is an ordinary ``launch/finetune.py`` command (resumable: a finished run is skipped).
Prints NDCG@10 on all test users and on the users whose target never occurs in training, and
writes ``bench/results/demo_variants.json`` with each run's training time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import machine, write_result
from reolm.demo import settings
from reolm.pipeline import Stage, python_command, run_stages

REPO = Path(__file__).resolve().parents[1]
DEMO_RUNS = ("sasrec", "reolm", "sasrec-textinit")  # what `make demo` ran
ADDED = "reolm-id"


def added_run(demo: Path, out: Path) -> list[Stage]:
    """The transductive Reo-LM in both settings, its runs under ``out`` (as the demo lays out its own)."""
    config = REPO / "launch" / "configs" / "finetune" / "demo.yaml"
    stages = []
    for setting, (domain, runs) in settings(demo).items():
        folder = out / runs.name / ADDED
        stages.append(Stage(f"{setting}: {ADDED}", python_command(
            "launch/finetune.py", "--domain", str(domain), "--config", str(config), "--model", "reolm", "--init",
            str(demo / "pretrained"), "reolm.item_id_embedding=true", "--out", str(folder)),
            folder / "metrics.json", inputs=[domain, demo / "pretrained"]))
    return stages


def summary(folder: Path) -> dict[str, float | int | None]:
    doc = json.loads((folder / "metrics.json").read_text())
    never = next(b for b in doc["by_item_frequency"] if b["max"] == 0)
    return {"all": round(doc["metrics"]["NDCG@10"], 4), "never_trained_target": round(never["metrics"]["NDCG@10"], 4),
            "never_trained_users": never["users"], "train_time_s": doc.get("train_time_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=REPO / "runs" / "demo", help="a finished `make demo` run")
    parser.add_argument("--out", type=Path, default=None, help="where the added runs go (default DEMO/variants)")
    parser.add_argument("--json", default="demo_variants.json", help="file name under bench/results/")
    args = parser.parse_args()
    out = args.out or args.demo / "variants"
    run_stages(out, added_run(args.demo, out), resume_hint="run this benchmark again to resume")
    values = {setting: {**{name: summary(runs / name) for name in DEMO_RUNS}, ADDED: summary(out / runs.name / ADDED)}
              for setting, (_, runs) in settings(args.demo).items()}
    print(f"{'setting':<12}{'model':<18}{'NDCG@10 all':>12}{'never-trained':>15}{'train s':>9}")
    for setting, row in values.items():
        for name, v in row.items():
            seconds = "-" if v["train_time_s"] is None else f"{v['train_time_s']:.0f}"
            print(f"{setting:<12}{name:<18}{v['all']:>12.4f}{v['never_trained_target']:>15.4f}{seconds:>9}")
    write_result(args.json, {"benchmark": "bench/demo_variants.py: the two text + ID variants on the demo's held-out "
                                          "domain (demo.yaml fine-tuning, seed 42), next to the demo's SASRec and "
                                          "Reo-LM", "machine": machine(), "demo": str(args.demo),
                             "ndcg_at_10": values})


if __name__ == "__main__":
    main()
