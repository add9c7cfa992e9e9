"""Which text + ID variant the demo shows: both, fine-tuned on a finished `make demo` run.

The demo (reolm/demo.py) carries one of the two text + ID variants as a row, to keep its time
down. This benchmark runs both on the demo's held-out domain, warm and on its cold-item split,
with the demo's fine-tuning config, next to the demo's own SASRec and Reo-LM runs:

* ``sasrec-textinit``: SASRec whose item rows start from the fine-tuned Reo-LM's item vectors
  (``--model sasrec --item-init RUN``);
* ``reolm-id``: transductive Reo-LM from the pre-trained export (``reolm.item_id_embedding=true``):
  each item's vector is its content vector plus a learned, zero-initialised ID row.

    python bench/demo_variants.py --demo runs/demo      # after `make demo`

Each run is an ordinary ``launch/finetune.py`` command (resumable: finished runs are skipped).
Prints NDCG@10 on all test users and on the users whose target never occurs in training, and
writes ``bench/results/demo_variants.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import machine, write_result
from reolm.pipeline import Stage, run_stages

REPO = Path(__file__).resolve().parents[1]

SETTINGS = {"warm": ("Scientific", "runs"), "cold items": ("Scientific-cold", "runs-cold")}
COMPARED = ("sasrec", "reolm", "sasrec-textinit", "reolm-id")


def variant_stages(demo: Path, out: Path) -> list[Stage]:
    config = REPO / "launch" / "configs" / "finetune" / "demo.yaml"
    stages = []
    for setting, (domain, runs) in SETTINGS.items():
        def fine_tune(name: str, *args: str) -> Stage:
            folder = out / runs / name
            return Stage(f"{setting}: {name}", [sys.executable, str(REPO / "launch" / "finetune.py"), "--domain",
                                                str(demo / "data" / domain), "--config", str(config), *args,
                                                "--out", str(folder)], folder / "metrics.json")
        stages += [fine_tune("sasrec-textinit", "--model", "sasrec", "--item-init", str(demo / runs / "reolm")),
                   fine_tune("reolm-id", "--model", "reolm", "--init", str(demo / "pretrained"),
                             "reolm.item_id_embedding=true")]
    return stages


def ndcg(folder: Path) -> dict[str, float | int]:
    doc = json.loads((folder / "metrics.json").read_text())
    never = next(b for b in doc["by_item_frequency"] if b["max"] == 0)
    return {"all": round(doc["metrics"]["NDCG@10"], 4), "never_trained_target": round(never["metrics"]["NDCG@10"], 4),
            "never_trained_users": never["users"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=REPO / "runs" / "demo", help="a finished `make demo` run")
    parser.add_argument("--out", type=Path, default=None, help="where the variants' runs go (default DEMO/variants)")
    parser.add_argument("--json", default="demo_variants.json", help="file name under bench/results/")
    args = parser.parse_args()
    out = args.out or args.demo / "variants"
    timings = run_stages(out, variant_stages(args.demo, out), resume_hint="run this benchmark again to resume")
    values = {setting: {name: ndcg((out if name in ("sasrec-textinit", "reolm-id") else args.demo) / runs / name)
                        for name in COMPARED}
              for setting, (_, runs) in SETTINGS.items()}
    print(f"{'setting':<12}{'model':<18}{'NDCG@10 all':>12}{'never-trained':>15}")
    for setting, row in values.items():
        for name, v in row.items():
            print(f"{setting:<12}{name:<18}{v['all']:>12.4f}{v['never_trained_target']:>15.4f}")
    write_result(args.json, {"benchmark": "bench/demo_variants.py: the two text + ID variants on the demo's held-out "
                                          "domain (demo.yaml fine-tuning, seed 42), next to the demo's SASRec and "
                                          "Reo-LM", "machine": machine(), "demo": str(args.demo),
                             "ndcg_at_10": values, "stage_seconds": {k: v["wall_s"] for k, v in timings.items()}})


if __name__ == "__main__":
    main()
