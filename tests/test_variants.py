"""Text + ID variants (issue 20): text-initialised SASRec (``sasrec-textinit``) and transductive
Reo-LM (``reolm.item_id_embedding``), on a cold-item split of the tiny preset's downstream domain
with a tiny random BERT (CPU, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_downstream_domain
from single_thread import one_thread  # noqa: F401  (autouse, module-scoped)

from reolm.baselines.base import ITEM_INIT_STD
from reolm.baselines.registry import load_baseline
from reolm.data.domain import read_domain, write_domain
from reolm.data.splits import cold_item_split
from reolm.data.tokenizer import item_texts, train_tokenizer
from reolm.eval.contract import read_metrics
from reolm.eval.frequency import item_train_counts
from reolm.eval.report import format_report, load_runs
from reolm.finetune.config import FinetuneConfig
from reolm.finetune.item_init import project_rows, text_item_rows
from reolm.random_init import init_backbone

COMMON = ["train.progress=false", "train.device=cpu", "train.seed=0", "eval.batch_size=64"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A 20% cold-item split of the tiny downstream domain, a tokenizer trained on it, a tiny BERT."""
    root = tmp_path_factory.mktemp("variants")
    warm = read_domain(tiny_downstream_domain(root))
    split, _, _ = cold_item_split(warm, 0.2, seed=0)
    cold = write_domain(split, root / "cold")
    tok = train_tokenizer(item_texts([cold]), root / "tok", kind="words", vocab_size=2000, progress=False)
    backbone = init_backbone(tok, root / "bert", size="tiny", max_position_embeddings=128)
    return {"root": root, "domain": cold, "backbone": backbone}


def _finetune(args: list[str]) -> int:
    from launch.finetune import main
    return main(args)


def _evaluate(args: list[str]) -> int:
    from launch.evaluate import main
    return main(args)


# ----------------------------------------------------------------------------- text-initialised SASRec

def test_project_rows_is_pca_scaled_to_the_init_std_and_deterministic():
    torch.manual_seed(0)
    vectors = torch.randn(50, 12) @ torch.diag(torch.linspace(3, 0.1, 12))
    rows = project_rows(vectors, 8, ITEM_INIT_STD)
    assert rows.shape == (50, 8) and rows.dtype == torch.float32
    assert rows.pow(2).mean().sqrt().item() == pytest.approx(ITEM_INIT_STD, rel=1e-5)
    variances = rows.var(0)
    assert (variances[:-1] >= variances[1:] - 1e-9).all()              # components by variance
    largest = rows.gather(0, rows.abs().argmax(0, keepdim=True))
    assert (largest > 0).all()                                         # the sign rule
    torch.testing.assert_close(project_rows(vectors * 7.0, 8, ITEM_INIT_STD), rows)  # norms ignored
    torch.testing.assert_close(project_rows(vectors, 8, ITEM_INIT_STD), rows, rtol=0, atol=0)
    wide = project_rows(vectors, 20, ITEM_INIT_STD)                    # D = 12 < width: zero columns
    assert wide[:, 12:].abs().sum() == 0 and wide.pow(2).mean().sqrt().item() == pytest.approx(ITEM_INIT_STD)
    with pytest.raises(ValueError, match="identical"):
        project_rows(torch.ones(5, 4), 3, ITEM_INIT_STD)


@pytest.fixture(scope="module")
def textinit_run(assets) -> Path:
    out = assets["root"] / "sasrec-textinit"
    assert _finetune(["--domain", str(assets["domain"]), "--out", str(out), "--model", "sasrec",
                      "--item-init", str(assets["backbone"]), "sasrec.hidden=16", "sasrec.blocks=1",
                      "train.epochs=3", "train.weight_decay=0.1", *COMMON]) == 0
    return out


def test_textinit_sasrec_keeps_the_text_rows_of_items_never_trained(textinit_run, assets):
    domain = read_domain(assets["domain"])
    doc = read_metrics(textinit_run / "metrics.json")
    assert doc["model"] == "sasrec-textinit" and doc["by_item_frequency"][0]["users"] > 0
    recorded = json.loads((textinit_run / "best" / "recommender.json").read_text())
    assert recorded["model_config"]["item_init"] == str(assets["backbone"])
    cfg = FinetuneConfig()
    expected = text_item_rows(assets["backbone"], domain, cfg, 16, ITEM_INIT_STD)
    trained = load_baseline(textinit_run / "best").item_embedding.weight.detach()[:-1]
    unseen = item_train_counts(domain) == 0
    assert unseen.sum() > 0
    # Exactly equal, through AdamW with weight decay: the rows of items never trained are text-derived.
    torch.testing.assert_close(trained[unseen], expected[unseen], rtol=0, atol=0)
    assert not torch.allclose(trained[~unseen], expected[~unseen])


def test_textinit_sasrec_evaluates_and_reports_under_its_own_name(textinit_run, assets, tmp_path):
    out = tmp_path / "eval.json"
    assert _evaluate(["--domain", str(assets["domain"]), "--model", str(textinit_run), "--split", "test",
                      "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    again, run = json.loads(out.read_text()), read_metrics(textinit_run / "metrics.json")
    assert again["model"] == "sasrec-textinit" and again["metrics"] == pytest.approx(run["metrics"])
    assert "SASRec (text init)" in format_report(load_runs([textinit_run]))


def test_item_init_is_refused_for_other_models_and_id_sources(textinit_run, assets, tmp_path, capsys):
    args = ["--domain", str(assets["domain"]), "--out", str(tmp_path / "x")]
    assert _finetune([*args, "--model", "gru4rec", "--item-init", str(assets["backbone"]), *COMMON]) == 1
    assert "--model sasrec only" in capsys.readouterr().err
    assert _finetune([*args, "--model", "sasrec", "--item-init", str(textinit_run), "train.epochs=1", *COMMON]) == 1
    assert "no item content" in capsys.readouterr().err
