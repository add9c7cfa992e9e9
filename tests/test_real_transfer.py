"""bench/real_transfer.py: the stage plan puts every model on the same protocol (no data needed)."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from reolm.config import load_config
from reolm.finetune.config import FinetuneConfig
from reolm.train.config import PretrainConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import real_transfer  # noqa: E402


def plan(tmp_path: Path, budget: str) -> tuple[list, dict]:
    sources = [tmp_path / n for n in ("Electronics", "Sports", "Toys")]
    return real_transfer.transfer_stages(tmp_path / "run", sources, tmp_path / "Tools", tmp_path / "minilm",
                                         real_transfer.BUDGETS[budget])


BASE_MODELS = {"zero-shot", "reolm", "reolm-nopretrain", "sasrec", "gru4rec", "bert4rec", "pop"}


def target_runs(stages: list) -> list:
    return [s for s in stages if "launch/finetune.py" in " ".join(s.argv) or "launch/evaluate.py" in " ".join(s.argv)]


def argv_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("budget", sorted(real_transfer.BUDGETS))
def test_every_target_model_gets_the_same_domain_and_users(tmp_path, budget):
    stages, models = plan(tmp_path, budget)
    b = real_transfer.BUDGETS[budget]
    extra = ({"reolm-id", "reolm-nopretrain-id", "sasrec-textinit"} if b.variants else set()) | (
        {"cold:zero-shot", "cold:pop", "cold:sasrec", "cold:reolm-nopretrain-id"} if b.cold_items else set())
    assert set(models) == BASE_MODELS | extra
    runs = target_runs(stages)
    # every model once, plus the zero-shot poolings that are recorded but not in the report
    assert len(runs) == len(models) + max(len(b.zero_shot_poolings) - 1, 0)
    subset = [f"eval.max_users={b.eval_users}", f"eval.subset_seed={b.eval_seed}"]
    domains = {str(tmp_path / "run" / "domains" / "Tools"), str(tmp_path / "run" / "domains" / "Tools-cold")}
    for stage in runs:
        argv = stage.argv
        assert argv_value(argv, "--domain") in domains
        assert " ".join(subset) in " ".join(argv)
        if "launch/finetune.py" in argv[1]:
            assert argv_value(argv, "--config") == str(REPO / b.finetune_config)
    cold_runs = [s for s in runs if argv_value(s.argv, "--domain").endswith("Tools-cold")]
    assert len(cold_runs) == (4 if b.cold_items else 0)
    pretrain = next(s for s in stages if "launch/pretrain.py" in " ".join(s.argv))
    assert Path(pretrain.argv[0]).name == "deepspeed" and "--num_gpus" in pretrain.argv
    shard = next(s for s in stages if s.argv[3:4] == ["shard"])
    assert [Path(a).name for a in shard.argv[-3:]] == ["Electronics", "Sports", "Toys"]  # the target is not sharded
    # The budget's configs load and agree on the adapter shape, so both Reo-LM runs are comparable.
    pre = load_config(PretrainConfig, [REPO / b.pretrain_config])
    ft = load_config(FinetuneConfig, [REPO / b.finetune_config])
    assert (pre.model.num_adapters, pre.model.adapter_rank) == (ft.reolm.model.num_adapters,
                                                                ft.reolm.model.adapter_rank)
    # Cheap, pre-training-independent runs come first: a stopped run has the baselines already.
    names = [s.name for s in stages]
    assert (names.index("baseline sasrec") < names.index("fine-tune Reo-LM from the backbone alone")
            < names.index(pretrain.name) < names.index("fine-tune Reo-LM from the pre-trained export"))


def test_cpu_real_runs_every_reolm_model_with_one_pooling_and_adds_the_variants(tmp_path):
    stages, models = plan(tmp_path, "cpu-real")
    b = real_transfer.BUDGETS["cpu-real"]
    pooling = f"reolm.model.pooling={b.pooling}"
    pretrain = next(s for s in stages if "launch/pretrain.py" in " ".join(s.argv))
    assert f"model.pooling={b.pooling}" in pretrain.argv  # the export, hence every --init run, pools the same way
    reolm_runs = [s for s in target_runs(stages) if "reolm" in s.argv[s.argv.index("--model") + 1:][:1]]
    assert len(reolm_runs) == 5 and all(pooling in s.argv for s in reolm_runs)
    zero_shots = {s.done_marker.parent.name: s.argv for s in stages if "launch/evaluate.py" in " ".join(s.argv)}
    assert {n for n in zero_shots} == {"plm-zeroshot-cls", "plm-zeroshot-mean", "plm-zeroshot"}
    assert models["zero-shot"].name == f"plm-zeroshot-{b.pooling}"
    by_out = {Path(argv_value(s.argv, "--out")): s for s in target_runs(stages) if "--out" in s.argv}
    ids = [s for s in by_out.values() if "reolm.item_id_embedding=true" in s.argv]
    assert {s.done_marker.parent for s in ids} == {models["reolm-id"], models["reolm-nopretrain-id"],
                                                   models["cold:reolm-nopretrain-id"]}
    assert [argv_value(s.argv, "--backbone") if "--backbone" in s.argv else argv_value(s.argv, "--init")
            for s in ids].count(str(tmp_path / "minilm")) == 2
    textinit = by_out[models["sasrec-textinit"]]
    source = models["reolm-nopretrain"]
    assert argv_value(textinit.argv, "--item-init") == str(source)
    assert source / "metrics.json" in textinit.inputs  # runs after the Reo-LM it starts from
    names = [s.name for s in stages]
    assert names.index(by_out[source].name) < names.index(textinit.name)
    report = stages[-1]
    assert report.name == "report" and all(str(d) in report.argv for d in models.values())


def test_learning_curve_counts_steps_across_stages(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"time_s": 0.0, "stage": "setup"},
               {"time_s": 5.0, "stage": "reolm-stage1", "epoch": 0, "val": {"NDCG@10": 0.01}},
               {"time_s": 60.0, "stage": "reolm-stage1", "epoch": 1, "steps": 200, "val": {"NDCG@10": 0.03}},
               {"time_s": 70.0, "stage": "reolm-stage1", "epoch": 2, "steps": 200},
               {"time_s": 120.0, "stage": "reolm-stage2", "epoch": 3, "steps": 150, "val": {"NDCG@10": 0.04}},
               {"time_s": 130.0, "stage": "test", "epoch": 3, "test": {"NDCG@10": 0.05}}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    curve = real_transfer.learning_curve(log)
    assert [(p["stage"], p["step"], p["time_s"], p["NDCG@10"]) for p in curve] == [
        ("reolm-stage1", 0, 5.0, 0.01), ("reolm-stage1", 200, 60.0, 0.03), ("reolm-stage2", 550, 120.0, 0.04)]
    real_transfer.plot_curves({"reolm": curve}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_lists_missing_inputs_and_rejects_same_names(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        code = real_transfer.main(["--pretrain", str(tmp_path / "a" / "X"), "--target", str(tmp_path / "T"),
                                   "--backbone", str(tmp_path / "bb"), "--run-dir", str(tmp_path / "run"),
                                   "--dry-run"])
    assert code == 0
    tail = out.getvalue().split("made by no stage", 1)[1]
    assert {line.split()[0] for line in tail.strip().splitlines()[1:]} == {str(tmp_path / "a" / "X"),
                                                                           str(tmp_path / "T"), str(tmp_path / "bb")}
    with pytest.raises(SystemExit):
        real_transfer.main(["--pretrain", str(tmp_path / "a" / "T"), "--target", str(tmp_path / "T"),
                            "--backbone", str(tmp_path / "bb"), "--dry-run"])


def test_record_of_an_unfinished_run_has_the_finished_runs_table_and_names_the_rest(tmp_path, monkeypatch):
    """--record-only before the end: finished runs are in ``runs`` and in the report table (a real
    ``reolm report`` over them), unfinished ones are null and listed in ``unfinished``."""
    import common
    from reolm.eval.contract import metrics_document, write_metrics

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    run_dir = tmp_path / "run"
    names = ("NDCG@5", "NDCG@10", "NDCG@20", "NDCG@50", "Recall@5", "Recall@10", "Recall@20", "Recall@50", "MRR", "AUC")
    for model, ndcg in (("sasrec", 0.05), ("reolm-nopretrain", 0.03)):
        metrics = {n: ndcg for n in names}
        write_metrics(run_dir / "runs" / model / "metrics.json", metrics_document(
            model=model, domain="Office", split="test", num_users=10, num_items=20, metrics=metrics,
            metrics_pessimistic=metrics, best_val=metrics))
    for name in ("Office", "Src"):
        (run_dir / "domains" / name).mkdir(parents=True)
        (run_dir / "domains" / name / "domain.json").write_text(json.dumps({"counts": {"users": 10, "items": 20}}))
    models = {m: run_dir / "runs" / m for m in ("sasrec", "reolm-nopretrain", "reolm")}
    inputs = {"pretrain:Src": tmp_path / "Src", "target": tmp_path / "Office", "backbone": tmp_path / "bb"}
    path = real_transfer.record_run(real_transfer.BUDGETS["cpu-real"], run_dir, models, {}, inputs)
    doc = json.loads(path.read_text())
    assert path == tmp_path / "results" / "real_quality_Office.json"
    assert doc["runs"]["reolm"] is None and doc["unfinished"] == ["reolm"]
    assert doc["runs"]["sasrec"]["metrics"]["NDCG@10"] == 0.05
    assert doc["table"]["values"]["Office"]["NDCG@10"] == {"sasrec": 0.05, "reolm-nopretrain": 0.03}
    assert "| Office | N@10 |" in (tmp_path / "results" / "real_quality_Office.md").read_text()


def test_only_a_lane_without_the_report_finishes_cleanly(tmp_path):
    """--only runs a lane; the report stage has not run, so there is no table to print, and the
    command still succeeds."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = real_transfer.main(["--pretrain", str(tmp_path / "a" / "X"), "--target", str(tmp_path / "T"),
                                   "--backbone", str(tmp_path / "bb"), "--run-dir", str(tmp_path / "run"),
                                   "--only", "no stage has this name"])
    assert code == 0 and "finished in" in out.getvalue() and not (tmp_path / "run" / "results.md").exists()


def test_record_keeps_only_the_timings_of_stages_whose_output_is_there(tmp_path):
    """A run moved aside to be redone (its budget changed) keeps an entry in timings.json until it
    runs again; the record must not count its old cost."""
    from reolm.pipeline import Stage

    done, moved = tmp_path / "a" / "metrics.json", tmp_path / "b" / "metrics.json"
    done.parent.mkdir()
    done.write_text("{}")
    stages = [Stage("kept", ["true"], done), Stage("moved aside", ["true"], moved)]
    timings = {"kept": {"wall_s": 5.0}, "moved aside": {"wall_s": 900.0}, "no longer a stage": {"wall_s": 1.0}}
    assert real_transfer._finished(timings, stages) == {"kept": {"wall_s": 5.0}}
