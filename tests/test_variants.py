"""Text + ID variants (issue 20): text-initialised SASRec (``sasrec-textinit``) and transductive
Reo-LM (``reolm.item_id_embedding``), on a cold-item split of the tiny preset's downstream domain
with a tiny random BERT (CPU, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_downstream_domain
from launch_helpers import finetune_main as _finetune, evaluate_main as _evaluate
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


# ----------------------------------------------------------------------------- transductive Reo-LM

REOLM_ID = ["--model", "reolm", "reolm.item_id_embedding=true", "reolm.model.num_adapters=2",
            "reolm.model.adapter_rank=8", "reolm.model.max_tokens=128", "reolm.model.attention=sdpa",
            "reolm.model.hidden_dropout=0.0", "reolm.model.attention_dropout=0.0", "reolm.negatives=16",
            "reolm.item_batch_size=64", "reolm.item_id_lr=1e-2", "reolm.stage1.epochs=1",
            "reolm.stage1.max_steps_per_epoch=4", "reolm.stage1.batch_size=16", "reolm.stage1.evals_per_epoch=1",
            "reolm.stage2.epochs=1", "reolm.stage2.max_steps_per_epoch=4", "reolm.stage2.batch_size=16",
            "reolm.stage2.evals_per_epoch=1", "reolm.stage2.warmup_steps=0", "reolm.stage1.warmup_steps=0"]


@pytest.fixture(scope="module")
def id_run(assets) -> Path:
    out = assets["root"] / "reolm-id"
    assert _finetune(["--domain", str(assets["domain"]), "--out", str(out), "--backbone", str(assets["backbone"]),
                      *REOLM_ID, *COMMON]) == 0
    return out


def _bound(folder: Path, domain) -> "ReoLMRecommender":
    from reolm.finetune.reolm_recommender import load_reolm
    rec = load_reolm(folder)
    rec.progress = False
    return rec.bind(domain)


def test_id_part_is_zero_for_items_never_trained_and_they_score_from_content(id_run, assets):
    from reolm.finetune.reolm_recommender import ITEM_ID_EMBEDDING
    domain = read_domain(assets["domain"])
    doc = read_metrics(id_run / "metrics.json")
    assert doc["model"] == "reolm-nopretrain-id" and doc["by_item_frequency"][0]["users"] > 0
    descriptor = json.loads((id_run / "best" / "recommender.json").read_text())
    assert descriptor["item_id_embedding"] == ITEM_ID_EMBEDDING and descriptor["model_config"]["item_id_embedding"]
    unseen = item_train_counts(domain) == 0
    for folder in (id_run / "stage1", id_run / "best"):
        ids = _bound(folder, domain).item_ids.detach()
        assert ids.shape == (domain.num_items, 64) and unseen.sum() > 0
        assert ids[unseen].abs().max() == 0, folder           # exactly zero: never in a loss
        assert ids[~unseen].abs().sum(1).gt(0).float().mean() > 0.5, folder  # trained rows moved
    rec = _bound(id_run / "best", domain)
    vectors, content = rec.item_vectors(), rec.item_table
    torch.testing.assert_close(vectors[unseen], content[unseen], rtol=0, atol=0)
    torch.testing.assert_close(vectors[~unseen], content[~unseen] + rec.item_ids.detach()[~unseen])
    with torch.no_grad():
        users = rec.user_vectors([domain.train[u] for u in list(domain.train)[:8]])
        scores, content_only = rec.model.score(users, vectors), rec.model.score(users, content)
    torch.testing.assert_close(scores[:, unseen], content_only[:, unseen], rtol=0, atol=0)
    assert not torch.allclose(scores[:, ~unseen], content_only[:, ~unseen])


@pytest.mark.parametrize("stage", [1, 2])
def test_both_stages_train_the_id_rows_of_trained_items_only(id_run, assets, stage):
    from reolm.finetune.reolm_trainer import PrefixCollate, PrefixDataset, TrainCost, parameter_groups, train_step
    domain = read_domain(assets["domain"])
    rec = _bound(id_run / "best", domain)
    rec.item_ids.requires_grad_(True)
    seen = item_train_counts(domain) > 0
    rec.train_items = torch.nonzero(seen).squeeze(1)
    assert any(g["params"] == [rec.item_ids] and g["lr"] == rec.section.item_id_lr
               for g in parameter_groups(rec, rec.section))
    dataset = PrefixDataset([s for s in domain.train.values() if len(s) >= 2], 10)
    collate = PrefixCollate(rec.collator(0.0, seed=0), domain.num_items, 16 if stage == 1 else None,
                            train_items=rec.train_items.numpy())
    train_step(rec, collate([dataset[i] for i in range(32)]), 0.0, TrainCost())
    grad = rec.item_ids.grad
    assert grad[~seen].abs().max() == 0 and grad[seen].abs().sum() > 0


def test_reolm_id_evaluates_like_its_run_and_reports_its_name(id_run, assets, tmp_path):
    out = tmp_path / "eval.json"
    assert _evaluate(["--domain", str(assets["domain"]), "--model", str(id_run), "--split", "test",
                      "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    again, run = json.loads(out.read_text()), read_metrics(id_run / "metrics.json")
    assert again["model"] == "reolm-nopretrain-id"
    assert again["metrics"] == pytest.approx(run["metrics"], abs=1e-6)
    assert "Reo-LM + ID (no pre-train)" in format_report(load_runs([id_run]))


def test_id_embedding_file_is_validated_on_load(id_run, tmp_path):
    import shutil
    from safetensors.torch import save_file
    from reolm.finetune.reolm_recommender import ITEM_ID_EMBEDDING, load_reolm
    folder = tmp_path / "best"
    shutil.copytree(id_run / "best", folder)
    save_file({"item_id_embedding": torch.zeros(3, 64)}, str(folder / ITEM_ID_EMBEDDING))
    with pytest.raises(ValueError, match=rf"{ITEM_ID_EMBEDDING}.*\(3, 64\).*expected"):
        load_reolm(folder)
    save_file({"rows": torch.zeros(3, 64)}, str(folder / ITEM_ID_EMBEDDING))
    with pytest.raises(ValueError, match=rf"{ITEM_ID_EMBEDDING}: no tensor 'item_id_embedding'"):
        load_reolm(folder)
    (folder / ITEM_ID_EMBEDDING).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{ITEM_ID_EMBEDDING}: missing"):
        load_reolm(folder)


def test_reolm_id_embeds_and_serves_new_items_from_content_alone(id_run, assets):
    from serve_helpers import Server
    from reolm.serve.config import EmbedConfig
    from reolm.serve.embed import embed_items
    from safetensors.numpy import load_file

    domain = read_domain(assets["domain"])
    index = assets["root"] / "id-index"
    manifest = embed_items(id_run, assets["domain"], index, EmbedConfig(progress=False))
    assert manifest["model"]["kind"] == "reolm-nopretrain-id"
    assert manifest["model"]["item_vectors"].endswith("+ ID rows")
    best = _bound(id_run / "best", domain)
    expected = torch.nn.functional.normalize(best.item_vectors(), dim=-1).numpy()
    vectors = load_file(str(index / manifest["files"]["vectors"]))["vectors"]
    np.testing.assert_allclose(vectors, expected, atol=1e-6)

    trained = item_train_counts(domain) > 0
    twin = int(torch.nonzero(trained & (best.item_ids.detach().abs().sum(1) > 0))[0])
    history = domain.train[0][-3:]
    with torch.no_grad():
        user = best.user_vectors([history])
        with_id = best.model.score(user, best.item_vectors())[0]
        content = best.model.score(user, best.item_table)[0]      # what an item without an ID row scores
    ids = domain.item_ids()
    srv = Server(id_run, index, assets["root"] / "id-server.log", "batch_wait_ms=5")
    try:
        srv.post("/items", {"items": [{"id": "twin", "attributes": domain.item_attributes(twin)}]})
        out = srv.post("/recommend", {"history": [ids[r] for r in history], "k": domain.num_items + 1,
                                      "exclude_history": False})
    finally:
        assert srv.stop() == 0
    scores = {item["id"]: item["score"] for item in out["items"]}
    assert scores[ids[twin]] == pytest.approx(float(with_id[twin]), abs=2e-3)       # catalogue: content + ID
    assert scores["twin"] == pytest.approx(float(content[twin]), abs=2e-3)          # added live: content only
    assert abs(float(with_id[twin]) - float(content[twin])) > 1e-2


def test_item_init_from_a_transductive_run_uses_the_vectors_it_scores_with(id_run, assets):
    domain = read_domain(assets["domain"])
    rows = text_item_rows(id_run, domain, FinetuneConfig(), 16, ITEM_INIT_STD)
    expected = project_rows(_bound(id_run / "best", domain).item_vectors(), 16, ITEM_INIT_STD)
    torch.testing.assert_close(rows, expected, rtol=0, atol=0)
