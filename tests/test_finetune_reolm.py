"""Reo-LM fine-tuning and evaluation end to end on a tiny synthetic domain (CPU, no downloads).

One module-scoped fine-tuning run (tiny random BERT + a WordPiece tokenizer trained on the
domain's text) feeds most tests: metrics.json contract, learning, evaluate.py reproduction,
the frozen stage-2 item table.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from conftest import tiny_downstream_domain
from launch_helpers import finetune_main as _finetune, evaluate_main as _evaluate
from single_thread import one_thread  # noqa: F401  (autouse, module-scoped)

from reolm.data.collate import PackedCollator, split_sequences
from reolm.data.domain import read_domain, write_domain
from reolm.data.tables import TableError, load_tokenizer
from reolm.data.tokenizer import item_texts, train_tokenizer
from reolm.eval.contract import read_metrics
from reolm.finetune.reolm_recommender import (ITEM_VECTORS, ReoLMRecommender, domain_image_table, load_reolm)
from reolm.finetune.reolm_trainer import PrefixCollate, PrefixDataset
from reolm.model import ModelConfig, ReoLM
from reolm.precision import resolve_precision
from reolm.random_init import init_backbone

REPO = Path(__file__).resolve().parents[1]

# Small and fast: 2 adapters of rank 8, 128-token sequences, a few capped epochs.
MODEL_OVERRIDES = ["reolm.model.num_adapters=2", "reolm.model.adapter_rank=8", "reolm.model.max_tokens=128",
                   "reolm.model.image_feature_dim=8", "reolm.model.attention=sdpa",
                   "reolm.model.hidden_dropout=0.0", "reolm.model.attention_dropout=0.0"]
TRAIN_OVERRIDES = ["train.progress=false", "train.seed=0", "train.device=cpu", "eval.batch_size=64",
                   "reolm.negatives=40", "reolm.item_batch_size=64", "reolm.initial_validation=true",
                   "reolm.stage1.epochs=15", "reolm.stage1.lr=2e-3", "reolm.stage1.batch_size=32",
                   "reolm.stage1.warmup_steps=5", "reolm.stage1.patience=6",
                   "reolm.stage2.epochs=6", "reolm.stage2.lr=1e-3", "reolm.stage2.batch_size=32",
                   "reolm.stage2.warmup_steps=0", "reolm.stage2.patience=3"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny preset's downstream domain, a tokenizer trained on it and a tiny random BERT."""
    root = tmp_path_factory.mktemp("reolm_ft")
    domain_dir = tiny_downstream_domain(root)
    # A vocabulary large enough to keep every word whole: with digit pieces, items of one topic
    # are nearly indistinguishable by text and popularity beats any text model.  `words` is
    # exactly reproducible, so the thresholds below see the same tokens on every run.
    tok = train_tokenizer(item_texts([domain_dir]), root / "tok", kind="words", vocab_size=2000,
                          progress=False)
    backbone = init_backbone(tok, root / "bert", size="tiny", max_position_embeddings=128)
    return {"root": root, "domain": domain_dir, "backbone": backbone}


@pytest.fixture(scope="module")
def run_dir(assets) -> Path:
    out = assets["root"] / "run-nopretrain"
    rc = _finetune(["--domain", str(assets["domain"]), "--out", str(out), "--model", "reolm",
                    "--backbone", str(assets["backbone"]), *MODEL_OVERRIDES, *TRAIN_OVERRIDES])
    assert rc == 0
    return out


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_finetune_from_hf_checkpoint_writes_contract_metrics(run_dir, assets):
    doc = read_metrics(run_dir / "metrics.json")  # validates the contract
    domain = read_domain(assets["domain"])
    assert doc["model"] == "reolm-nopretrain" and doc["split"] == "test"
    assert doc["num_items"] == domain.num_items and doc["num_users"] == len(domain.test)
    assert doc["best_stage"] in (1, 2) and doc["stage1"]["epochs_run"] > 0
    assert doc["precision"] == resolve_precision("auto", "cpu", hidden_size=32)  # what it trained in (tiny: fp32)
    records = _log(run_dir)
    stage1_epochs = [r["epoch"] for r in records if r.get("stage") == "reolm-stage1" and "train_loss" in r]
    assert stage1_epochs[:3] == [0.5, 1.0, 1.5]  # validation every half epoch
    assert any(r.get("stage") == "reolm-stage2" and "train_loss" in r for r in records)
    # The token table was built on the fly for the backbone's tokenizer.
    assert list((assets["domain"] / "tables").glob("tokens-*/table.json"))
    # best/ is complete: export + frozen item table + descriptor + config; the source is recorded.
    best = run_dir / "best"
    for name in ("config.json", "model.safetensors", ITEM_VECTORS, "recommender.json", "config.yaml"):
        assert (best / name).is_file(), name
    assert str(assets["backbone"]) in (run_dir / "config.yaml").read_text()


def test_best_epoch_counts_like_the_log(run_dir):
    doc = read_metrics(run_dir / "metrics.json")
    stage = f"reolm-stage{doc['best_stage']}"
    improved = [r for r in _log(run_dir) if r.get("stage") == stage and r.get("improved")]
    assert improved[-1]["epoch"] == doc["best_epoch"]  # stage 2 continues stage 1's epochs
    assert json.loads((run_dir / "best" / "recommender.json").read_text())["epoch"] == doc["best_epoch"]
    s1, s2 = doc["stage1"], doc["stage2"]
    assert s2["best_epoch"] == s2["best_stage_epoch"] + s1["epochs_run"]
    assert doc["epochs_run"] == s1["epochs_run"] + s2["epochs_run"]
    setup = _log(run_dir)[0]
    assert setup["gradient_checkpointing"] is True  # automatic on CPU


def test_finetuning_improves_validation_ndcg(run_dir):
    records = _log(run_dir)
    stage1 = [r for r in records if r.get("stage") == "reolm-stage1" and "val" in r]
    start = stage1[0]["val"]["NDCG@10"]  # initial_validation: the untrained starting point
    assert stage1[0]["epoch"] == 0
    best = max(r["val"]["NDCG@10"] for r in stage1)
    assert best > start + 0.05, (start, best)
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["best_val"]["NDCG@10"] >= best - 1e-12  # stage 2 is kept only if it is not worse


def test_finetuned_reolm_beats_popularity(run_dir, assets):
    pop = assets["root"] / "run-pop"
    assert _finetune(["--domain", str(assets["domain"]), "--out", str(pop), "--model", "pop",
                      "train.progress=false"]) == 0
    reolm, baseline = read_metrics(run_dir / "metrics.json"), read_metrics(pop / "metrics.json")
    assert reolm["metrics"]["NDCG@10"] > baseline["metrics"]["NDCG@10"], (reolm["metrics"], baseline["metrics"])


def test_evaluate_reproduces_run_test_metrics(run_dir, assets, tmp_path):
    run_doc = json.loads((run_dir / "metrics.json").read_text())
    for target in (run_dir, run_dir / "best"):
        out = tmp_path / f"{target.name}.json"
        assert _evaluate(["--domain", str(assets["domain"]), "--model", str(target), "--split", "test",
                          "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
        doc = json.loads(out.read_text())
        assert doc["model"] == "reolm-nopretrain" and doc["precision"] == run_doc["precision"]
        for name, value in run_doc["metrics"].items():
            assert doc["metrics"][name] == pytest.approx(value, abs=1e-9), name


def test_stage2_item_table_is_stage1_best_encoding(run_dir, assets):
    domain = read_domain(assets["domain"])
    table = load_file(str(run_dir / "best" / ITEM_VECTORS))["item_vectors"]
    stage1 = load_reolm(run_dir / "stage1").bind(domain)
    assert stage1.item_table is None  # stage 1 folders encode items live
    expected = stage1.encode_all_items()
    assert table.shape == (domain.num_items, stage1.model.backbone_config.hidden_size)
    torch.testing.assert_close(table, expected, rtol=1e-5, atol=1e-5)
    best = load_reolm(run_dir / "best").bind(domain)
    if json.loads((run_dir / "metrics.json").read_text())["best_stage"] == 2:
        # Stage 2 moved the encoder but scores against the frozen table, not live item vectors.
        assert not torch.allclose(best.encode_all_items(), table, atol=1e-4)
        torch.testing.assert_close(best.item_vectors(), table)


def test_finetune_from_pretrained_export_and_zero_shot(assets, tmp_path):
    cfg = ModelConfig(num_adapters=2, adapter_rank=8, max_tokens=128, image_feature_dim=8, attention="sdpa")
    model = ReoLM.from_backbone(assets["backbone"], cfg)
    export = model.save_pretrained(tmp_path / "export", load_tokenizer(assets["backbone"]))
    # Zero-shot: evaluate.py on the bare export.
    out = tmp_path / "zeroshot.json"
    assert _evaluate(["--domain", str(assets["domain"]), "--model", str(export), "--split", "test",
                      "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    doc = read_metrics(out, run=False)
    assert doc["model"] == "reolm-zeroshot" and doc["split"] == "test"
    rec = load_reolm(export)
    assert {layer.routing for layer in rec.model.encoder.layer[rec.model.num_bottom_layers:]} == {"mean"}
    # Fine-tuning from the export (one short stage each) reports "reolm".
    run = tmp_path / "run-init"
    assert _finetune(["--domain", str(assets["domain"]), "--out", str(run), "--model", "reolm",
                      "--init", str(export), *TRAIN_OVERRIDES, "reolm.initial_validation=false",
                      "reolm.stage1.epochs=1", "reolm.stage1.max_steps_per_epoch=4",
                      "reolm.stage2.epochs=1", "reolm.stage2.max_steps_per_epoch=4"]) == 0
    doc = read_metrics(run / "metrics.json")
    assert doc["model"] == "reolm"
    assert json.loads((run / "best" / "recommender.json").read_text())["model"] == "reolm"


def test_image_feature_dim_mismatch_is_a_clear_error(assets, tmp_path):
    domain = read_domain(assets["domain"])
    domain.image_features = np.zeros((domain.num_items, 6), dtype=np.float16)
    domain.has_image = np.ones(domain.num_items, dtype=bool)
    write_domain(domain, tmp_path / "dom")
    with pytest.raises(TableError, match=r"image_features\.npy has d=6 .* takes d=8"):
        domain_image_table(read_domain(tmp_path / "dom"), ModelConfig(image_feature_dim=8))
    # Without features every item uses the void image (a zero-copy table of the model's width).
    domain.image_features = domain.has_image = None
    table = domain_image_table(domain, ModelConfig(image_feature_dim=8))
    assert table.dim == 8 and not table.has_image.any() and len(table) == domain.num_items


def test_prefix_dataset_and_stage1_candidates(assets):
    data = PrefixDataset([[5, 6, 7, 8], [1], [2, 3]], max_history=2)
    assert [data[i] for i in range(len(data))] == [([5], 6), ([5, 6], 7), ([6, 7], 8), ([2], 3)]
    model = ReoLM.from_backbone(assets["backbone"], ModelConfig(num_adapters=2, adapter_rank=8, max_tokens=128,
                                                                image_feature_dim=8))
    tokenizer = load_tokenizer(assets["backbone"])
    rec = ReoLMRecommender(model, tokenizer, progress=False).bind(read_domain(assets["domain"]))
    collator: PackedCollator = rec.collator(mlm_probability=0.15, seed=0)
    batch = PrefixCollate(collator, rec.num_items, negatives=20)([([1, 2], 3), ([4], 3), ([7, 8, 9], 11)])
    (micro,), (items,) = batch.micro, batch.pools
    pieces = split_sequences(items.input_ids, items)  # example order: [CLS], item text, image token
    assert 20 <= len(pieces) <= 22  # 20 distinct negatives + the targets {3, 11}, no duplicates
    # Each label points at its target's [CLS] item sequence.
    for label, target in zip(micro.labels.tolist(), [3, 3, 11]):
        assert pieces[label][1:-1].tolist() == rec.tokens.item(target)[0].tolist()
    assert micro.history.mlm_positions.numel() > 0  # the history is masked for the MLM loss
    stage2 = PrefixCollate(rec.collator(0.0), rec.num_items, negatives=None)([([1, 2], 3)])
    assert stage2.micro[0].labels.tolist() == [3] and stage2.pools == [] and stage2.micro[0].pool is None
    # A pool of trained items: negatives come only from it, stage-2 labels are positions in it.
    pool = np.array([0, 3, 5, 6, 11, 12, 13, 20])
    batch = PrefixCollate(collator, rec.num_items, negatives=30, train_items=pool)([([1, 2], 3), ([4], 11)])
    items = batch.pools[0]
    pieces = split_sequences(items.input_ids, items)
    candidates = [int(i) for i in pool if any(p[1:-1].tolist() == rec.tokens.item(int(i))[0].tolist() for p in pieces)]
    assert len(pieces) == len(pool) and candidates == pool.tolist()
    stage2 = PrefixCollate(rec.collator(0.0), rec.num_items, negatives=None, train_items=pool)([([1, 2], 3), ([4], 20)])
    assert stage2.micro[0].labels.tolist() == [1, 7]


def _tiny_rec(assets) -> ReoLMRecommender:
    model = ReoLM.from_backbone(assets["backbone"], ModelConfig(
        num_adapters=2, adapter_rank=8, max_tokens=128, image_feature_dim=8, attention="sdpa", hidden_dropout=0.0,
        attention_dropout=0.0, top_routing="gate"))
    tokenizer = load_tokenizer(assets["backbone"])
    return ReoLMRecommender(model.double(), tokenizer, progress=False).bind(read_domain(assets["domain"]))


EXAMPLES = [([1, 2], 3), ([4], 3), ([7, 8, 9], 11), ([5], 6), ([2, 3, 4], 9), ([10], 12)]


def test_shared_pool_serves_every_micro_batch_of_the_step(assets):
    rec = _tiny_rec(assets)
    per_micro = PrefixCollate(rec.collator(0.0, seed=0), rec.num_items, 5, micro_batch=2)(EXAMPLES)
    shared = PrefixCollate(rec.collator(0.0, seed=0), rec.num_items, 5, micro_batch=2, shared=True)(EXAMPLES)
    assert len(per_micro.pools) == 3 and [m.pool for m in per_micro.micro] == [0, 1, 2]
    (pool,) = shared.pools
    pieces = split_sequences(pool.input_ids, pool)
    assert 7 <= len(pieces) <= 12  # every target of the step (7 distinct) plus 5 negatives, deduplicated
    for m, part in zip(shared.micro, [EXAMPLES[0:2], EXAMPLES[2:4], EXAMPLES[4:6]]):
        assert m.pool == 0
        for label, (_, target) in zip(m.labels.tolist(), part):
            assert pieces[label][1:-1].tolist() == rec.tokens.item(target)[0].tolist()


def test_accumulated_shared_pool_step_equals_one_large_batch(assets):
    """Three micro-batches against one pool encoded once: the gradients of one batch of six."""
    from reolm.finetune.reolm_trainer import TrainCost, train_step
    rec = _tiny_rec(assets).train()
    step = PrefixCollate(rec.collator(0.0, seed=0), rec.num_items, 5, micro_batch=2, shared=True)(EXAMPLES)
    whole = PrefixCollate(rec.collator(0.0, seed=0), rec.num_items, 5, micro_batch=6, shared=True)(EXAMPLES)
    assert torch.equal(step.pools[0].input_ids, whole.pools[0].input_ids)  # same seed, same pool

    def grads(batch, cost):
        rec.zero_grad()
        loss = train_step(rec, batch, 0.0, cost)
        return loss, {n: p.grad.clone() for n, p in rec.named_parameters() if p.grad is not None}

    cost_step, cost_whole = TrainCost(), TrainCost()
    (loss_a, g_a), (loss_b, g_b) = grads(step, cost_step), grads(whole, cost_whole)
    assert torch.allclose(loss_a, loss_b, atol=1e-12, rtol=0) and g_a.keys() == g_b.keys()
    scale = torch.stack([g.norm() for g in g_b.values()]).norm()
    for name in g_a:  # fp64 throughout: equal to rounding
        assert (g_a[name] - g_b[name]).norm() <= 1e-9 * scale, name
    assert g_a["model.embeddings.word_embeddings.weight"].abs().sum() > 0
    assert cost_step.examples == cost_whole.examples == 6
    # Same sequences, split into micro-batches differently: FLOPs are a sum over sequences, so equal.
    assert cost_step.flops == cost_whole.flops > 0
    # the reference (a fresh pool per micro-batch) encodes three pools for the same six histories
    reference = TrainCost()
    grads(PrefixCollate(rec.collator(0.0, seed=0), rec.num_items, 5, micro_batch=2)(EXAMPLES), reference)
    assert reference.flops > 1.3 * cost_step.flops


def test_catalogue_encoding_is_length_sorted_reused_and_refreshed(assets):
    rec = _tiny_rec(assets).eval()
    rec.section = dataclasses.replace(rec.section, item_batch_size=7)
    vectors = rec.encode_all_items()
    with torch.no_grad():  # item i's own [CLS] item sequence, one at a time, in item order
        alone = torch.cat([rec.model.encode(rec.eval_collate.collate_items([i])) for i in (0, 5, 17)])
    assert torch.allclose(vectors[[0, 5, 17]], alone.float(), atol=1e-9, rtol=0)
    assert rec.last_encoding["items"] == rec.num_items and rec.last_encoding["tokens_per_s"] > 0
    assert rec.encode_all_items() is vectors  # unchanged weights: reused
    with torch.no_grad():
        rec.model.encoder.layer[0].intermediate.dense.weight.mul_(3.0)
    fresh = rec.encode_all_items()
    assert fresh is not vectors and not torch.allclose(fresh, vectors)


def test_training_loss_is_summed_on_the_device_and_workers_follow_the_device():
    """The round's loss is summed where the loss lives (a meta tensor cannot be copied to the
    host, so a per-step host copy would raise here), and reolm.num_workers null means worker
    processes on a GPU only."""
    from reolm.finetune.reolm_trainer import workers_for
    from reolm.finetune.runner import add_loss

    total = None
    for value in (1.0, 2.0):
        total = add_loss(total, torch.tensor(value, device="meta", dtype=torch.bfloat16, requires_grad=True))
    assert total.device.type == "meta" and total.dtype == torch.float64 and not total.requires_grad
    on_cpu = add_loss(add_loss(None, torch.tensor(1.5)), torch.tensor(2.25, dtype=torch.bfloat16))
    assert on_cpu.item() == 3.75
    assert workers_for(None, torch.device("cuda")) == 2 and workers_for(None, torch.device("cpu")) == 0
    assert workers_for(3, torch.device("cpu")) == 3 and workers_for(0, torch.device("cuda")) == 0
