"""Results table: bold best, improvement over the best baseline, JSON, plots; the metrics contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reolm.cli import main as reolm_main
from reolm.eval.contract import ContractError, metrics_document, validate_metrics, write_metrics
from reolm.eval.report import build_table, format_markdown, load_runs, plot_bars, plot_curves

NAMES = ("NDCG@5", "NDCG@10", "NDCG@20", "NDCG@50", "Recall@5", "Recall@10", "Recall@20", "Recall@50", "MRR", "AUC")


def _doc(model: str, domain: str, ndcg: float, recall: float, mrr: float) -> dict:
    metrics = {n: 0.5 for n in NAMES}
    metrics.update({"NDCG@10": ndcg, "Recall@10": recall, "MRR": mrr})
    return metrics_document(model=model, domain=domain, split="test", num_users=10, num_items=20,
                            metrics=metrics, metrics_pessimistic={n: v * 0.9 for n, v in metrics.items()},
                            best_val=metrics)


def _write_run(root: Path, name: str, doc: dict, log: list[dict] | None = None) -> Path:
    run = root / name
    write_metrics(run / "metrics.json", doc)
    if log is not None:
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return run


@pytest.fixture
def run_dirs(tmp_path) -> list[Path]:
    docs = [("pop", "Sci", 0.01, 0.02, 0.01), ("sasrec", "Sci", 0.08, 0.10, 0.07),
            ("gru4rec", "Sci", 0.06, 0.12, 0.05), ("reolm", "Sci", 0.10, 0.11, 0.0805),
            ("reolm-nopretrain", "Sci", 0.09, 0.13, 0.09),
            ("sasrec", "Office", 0.05, 0.07, 0.04), ("reolm", "Office", 0.04, 0.07, 0.05)]
    log = [{"stage": "setup", "domain": "Sci", "model": "x"},
           {"stage": "x", "epoch": 1, "train_loss": 3.0, "val": {"NDCG@10": 0.1}},
           {"stage": "x", "epoch": 2, "train_loss": 2.0, "val": {"NDCG@10": 0.2}}]
    return [_write_run(tmp_path, f"{d}-{m}", _doc(m, d, *v), log) for m, d, *v in docs]


def test_table_bold_and_improvement(run_dirs):
    table = build_table(load_runs(run_dirs))
    assert table.domains == ["Sci", "Office"]
    assert table.models == ["pop", "gru4rec", "sasrec", "reolm-nopretrain", "reolm"]
    assert table.best["Sci"]["NDCG@10"] == ["reolm"]
    assert table.best["Sci"]["Recall@10"] == ["reolm-nopretrain"]
    assert table.best["Office"]["Recall@10"] == ["sasrec", "reolm"]       # a tie: both bold
    # improvement over the best *baseline*; the Reo-LM ablation is not a baseline
    assert table.improvement["Sci"]["NDCG@10"] == pytest.approx(25.0)      # 0.10 vs SASRec 0.08
    assert table.improvement["Sci"]["Recall@10"] == pytest.approx(100 * (0.11 / 0.12 - 1))  # vs GRU4Rec
    assert table.improvement["Office"]["NDCG@10"] == pytest.approx(-20.0)
    md = format_markdown(table)
    lines = md.splitlines()
    assert lines[0] == "| Dataset | Metric | Pop | GRU4Rec | SASRec | Reo-LM (no pre-train) | Reo-LM | Improv. |"
    assert lines[2] == "| Sci | N@10 | 0.0100 | 0.0600 | 0.0800 | 0.0900 | **0.1000** | +25.00% |"
    assert lines[4] == "|  | MRR | 0.0100 | 0.0500 | 0.0700 | **0.0900** | 0.0805 | +15.00% |"
    assert lines[5] == "| Office | N@10 | – | – | **0.0500** | – | 0.0400 | -20.00% |"


def test_duplicate_runs_are_rejected(run_dirs, tmp_path):
    extra = _write_run(tmp_path / "again", "x", _doc("sasrec", "Sci", 0.1, 0.1, 0.1))
    with pytest.raises(ValueError, match="two runs of model 'sasrec' on domain 'Sci'"):
        build_table(load_runs(run_dirs + [extra]))


def test_no_improvement_column_value_without_reolm(tmp_path):
    run = _write_run(tmp_path, "a", _doc("sasrec", "Sci", 0.1, 0.1, 0.1))
    table = build_table(load_runs([run]))
    assert table.improvement["Sci"]["NDCG@10"] is None
    assert format_markdown(table).splitlines()[2].endswith("| – |")


def test_report_command_writes_markdown_json_and_pngs(run_dirs, tmp_path):
    out, js, plot, curves = (tmp_path / n for n in ("t.md", "t.json", "bars.png", "curves.png"))
    code = reolm_main(["report", *map(str, run_dirs), "--out", str(out), "--json", str(js), "--plot", str(plot),
                       "--curves", str(curves)])
    assert code == 0
    assert "**0.1000**" in out.read_text()
    data = json.loads(js.read_text())
    assert data["values"]["Sci"]["NDCG@10"]["sasrec"] == pytest.approx(0.08)
    assert data["improvement_pct"]["Sci"]["NDCG@10"] == pytest.approx(25.0)
    for png in (plot, curves):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_report_command_names_a_bad_metrics_file(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text(json.dumps({"model": "sasrec"}))
    assert reolm_main(["report", str(bad)]) == 1
    assert "bad/metrics.json" in capsys.readouterr().err


def test_contract_validator_rejects_violations():
    good = _doc("sasrec", "Sci", 0.1, 0.2, 0.1)
    validate_metrics(good)
    for mutate, message in [(lambda d: d.update(model="foo"), "model"),
                            (lambda d: d.update(split="val"), "split"),
                            (lambda d: d.update(ties="pessimistic"), "ties"),
                            (lambda d: d.update(num_users=0), "num_users"),
                            (lambda d: d["metrics"].pop("MRR"), "metrics.MRR"),
                            (lambda d: d["metrics"].update({"AUC": 1.5}), "outside"),
                            (lambda d: d["metrics"].update({"NDCG@10": float("nan")}), "finite"),
                            (lambda d: d.pop("best_val"), "best_val"),
                            (lambda d: d["metrics_pessimistic"].update({"MRR": 0.9}), "exceeds")]:
        doc = json.loads(json.dumps(good))
        mutate(doc)
        with pytest.raises(ContractError, match=message):
            validate_metrics(doc)
    evaluation = json.loads(json.dumps(good))
    evaluation.pop("best_val")
    evaluation["split"] = "val"
    validate_metrics(evaluation, run=False)  # launch/evaluate.py output: any split, no best_val


def test_plots_can_be_called_directly(run_dirs, tmp_path):
    table = build_table(load_runs(run_dirs))
    assert plot_bars(table, tmp_path / "b.png").is_file()
    assert plot_curves(run_dirs[:2], tmp_path / "c.png").is_file()
    with pytest.raises(FileNotFoundError, match="log.jsonl"):
        plot_curves([tmp_path], tmp_path / "d.png")
