"""Cold-start evaluation: frequency buckets, cold-item / few-shot splits, untrained rows of unseen
items, and the acceptance run (cold split -> SASRec and Reo-LM -> bucket "0" with users)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_domain, tiny_downstream_domain
from launch_helpers import finetune_main as _finetune
from single_thread import one_thread  # noqa: F401  (autouse, module-scoped)

from reolm.baselines.base import full_softmax_ce
from reolm.baselines.popularity import Popularity
from reolm.baselines.config import SASRecConfig
from reolm.baselines.registry import build_baseline, load_baseline
from reolm.cli import main as reolm_main
from reolm.data.domain import Domain, read_domain, write_domain
from reolm.data.splits import COLD_ITEMS_FILE, cold_item_split, few_shot_split, setting_name
from reolm.eval.contract import ContractError, read_metrics, validate_metrics
from reolm.eval.evaluate import evaluate_recommender
from reolm.eval.frequency import FrequencyBuckets, item_train_counts
from reolm.eval.report import format_report, load_runs, report_json
from reolm.seeding import seed_everything


# ----------------------------------------------------------------------------- buckets

def test_frequency_buckets_labels_bounds_and_assignment():
    buckets = FrequencyBuckets()
    assert [buckets.label(i) for i in range(len(buckets))] == ["0", "1-4", "5-19", "20+"]
    assert buckets.bounds(0) == (0, 0) and buckets.bounds(3) == (20, None)
    counts = torch.tensor([0, 1, 4, 5, 19, 20, 1000])
    assert buckets.assign(counts).tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert [FrequencyBuckets((0, 2)).label(i) for i in range(2)] == ["0-1", "2+"]
    for bad in ((1, 5), (0, 5, 5), ()):
        with pytest.raises(ValueError):
            FrequencyBuckets(bad)


def _hand_domain() -> Domain:
    """6 items; training counts: item0 x4, item1 x3, item2 x2, item3 x1, items 4 and 5 never."""
    train = {0: [0, 1, 2, 3], 1: [0, 1, 2], 2: [0, 1], 3: [0]}
    val = {u: [4] for u in train}
    test = {0: [5], 1: [4], 2: [0], 3: [3]}   # targets seen 0, 0, 4 and 1 times
    return Domain(name="hand", train=train, val=val, test=test, smap={f"i{i}": i for i in range(6)},
                  umap={f"u{u}": u for u in range(4)}, meta={f"i{i}": {"title": f"t{i}"} for i in range(6)})


def test_buckets_are_the_overall_ranks_split_by_target_frequency():
    domain = _hand_domain()
    assert item_train_counts(domain).tolist() == [4, 3, 2, 1, 0, 0]
    pop = Popularity(domain.num_items).fit(domain.train.values())
    result = evaluate_recommender(pop, domain, "test", frequency_buckets=(0, 1, 4), progress=False)
    by = {b["bucket"]: b for b in result.by_item_frequency}
    assert list(by) == ["0", "1-3", "4+"] and [b["users"] for b in by.values()] == [2, 1, 1]
    # Popularity ranks items 0 > 1 > 2 > 3 > {4, 5}: cold targets (4, 5) have optimistic rank 4 (ties
    # with each other favour the target) and pessimistic rank 5; item 3 rank 3; item 0 rank 0.
    assert by["0"]["metrics"]["MRR"] == pytest.approx(1 / 5)
    assert by["0"]["metrics_pessimistic"]["MRR"] == pytest.approx(1 / 6)
    assert by["1-3"]["metrics"]["MRR"] == pytest.approx(1 / 4)
    assert by["4+"]["metrics"]["NDCG@5"] == pytest.approx(1.0)
    # The user-weighted mean of the buckets is the overall value.
    for name, value in result.metrics.items():
        mean = sum(b["users"] * b["metrics"][name] for b in by.values()) / result.num_users
        assert mean == pytest.approx(value), name


def test_empty_bucket_has_null_metrics_and_contract_checks_counts():
    domain = _hand_domain()
    pop = Popularity(domain.num_items).fit(domain.train.values())
    result = evaluate_recommender(pop, domain, "test", frequency_buckets=(0, 1, 100), progress=False)
    assert result.by_item_frequency[2] == {"bucket": "100+", "min": 100, "max": None, "users": 0,
                                           "metrics": None, "metrics_pessimistic": None}
    doc = {"model": "pop", "domain": "hand", "split": "test", "num_users": 4, "num_items": 6, "ties": "optimistic",
           "metrics": result.metrics, "metrics_pessimistic": result.metrics_pessimistic,
           "by_item_frequency": result.by_item_frequency}
    validate_metrics(doc, run=False)
    doc["by_item_frequency"] = [dict(result.by_item_frequency[0], users=3), *result.by_item_frequency[1:]]
    with pytest.raises(ContractError, match="counts 5 users but num_users is 4"):
        validate_metrics(doc, run=False)


# ----------------------------------------------------------------------------- splits

def test_cold_item_split_removes_items_from_training_only():
    domain = make_domain(num_users=60, num_items=50, seed=3)
    split, record, cold_ids = cold_item_split(domain, 0.2, seed=7)
    cold = {domain.smap[i] for i in cold_ids}
    assert len(cold) == 10 and record["cold_items"] == 10 and record["kind"] == "cold-items"
    assert split.smap == domain.smap  # same items and indices: image features and tables stay valid
    assert not any(i in cold for seq in split.train.values() for i in seq)
    ids = {idx: uid for uid, idx in domain.umap.items()}
    new = {uid: idx for uid, idx in split.umap.items()}
    kept = [u for u in domain.train if any(i not in cold for i in domain.train[u])]
    assert len(split.train) == len(kept) == domain.num_users - record["dropped_users"]
    for u in kept:  # val/test untouched; train = the original minus the cold items, order kept
        v = new[ids[u]]
        assert split.val[v] == domain.val[u] and split.test[v] == domain.test[u]
        assert split.train[v] == [i for i in domain.train[u] if i not in cold]
    assert record["cold_test_targets"] == sum(1 for t in split.test.values() if t[0] in cold) > 0
    again = cold_item_split(domain, 0.2, seed=7)[2]
    assert again == cold_ids and cold_item_split(domain, 0.2, seed=8)[2] != cold_ids
    with pytest.raises(ValueError, match="--fraction"):
        cold_item_split(domain, 1.0, seed=0)


def test_few_shot_split_keeps_a_fraction_of_users():
    domain = make_domain(num_users=40, num_items=30, seed=1)
    split, record = few_shot_split(domain, 0.25, seed=2)
    assert split.num_users == len(split.train) == 10 == record["kept_users"]
    assert sorted(split.umap.values()) == list(range(10))
    for uid, v in split.umap.items():
        assert split.train[v] == domain.train[domain.umap[uid]] and split.test[v] == domain.test[domain.umap[uid]]
    split.validate()


def test_split_command_writes_a_domain_with_provenance_and_stats_report_cold_items(tmp_path, capsys):
    src = write_domain(make_domain(num_users=60, num_items=50, seed=3), tmp_path / "src")
    np.save(src / "has_image.npy", np.arange(50) % 2 == 0)
    out = tmp_path / "cold"
    assert reolm_main(["split", "cold-items", str(src), "--fraction", "0.2", "--seed", "7", "--out", str(out)]) == 0
    split = read_domain(out)
    assert setting_name(split) == "cold-items"
    (record,) = split.extra["splits"]
    assert record["fraction"] == 0.2 and record["seed"] == 7 and record["source"] == str(src)
    cold_ids = json.loads((out / COLD_ITEMS_FILE).read_text())
    assert len(cold_ids) == 10 and split.has_image is not None and split.has_image.sum() == 25
    assert reolm_main(["split", "few-shot", str(out), "--users", "0.5", "--seed", "1", "--out",
                       str(tmp_path / "few")]) == 0
    assert setting_name(read_domain(tmp_path / "few")) == "cold-items+few-shot"
    capsys.readouterr()
    assert reolm_main(["stats", "--json", str(src), str(out)]) == 0
    before, after = json.loads(capsys.readouterr().out)
    trained = {i for seq in split.train.values() for i in seq}
    held_out = {t[0] for s in (split.val, split.test) for t in s.values()}
    assert after["cold_items"] == len(held_out - trained) > before["cold_items"]
    assert after["cold_test_users"] == sum(1 for t in split.test.values() if t[0] not in trained)
    assert after["cold_test_users"] >= record["cold_test_targets"] > before["cold_test_users"]
    assert after["splits"] == ["cold-items"]
    assert reolm_main(["split", "cold-items", str(src), "--fraction", "0.2", "--out", str(src)]) == 1


# ----------------------------------------------------------------------------- honest ID rows

def test_unseen_items_get_no_gradient_and_negatives_are_trained_items():
    torch.manual_seed(0)
    model = build_baseline("sasrec", 12, SASRecConfig(hidden=8, blocks=1, heads=1, max_history_items=6, dropout=0.0))
    seen = torch.ones(12, dtype=torch.bool)
    seen[[3, 7, 11]] = False
    model.set_training_items(seen)
    ids = torch.tensor([[0, 1, 2, 4, 5, 6], [8, 9, 10, 0, 1, 2]])
    model.training_loss(ids, torch.tensor([6, 6])).backward()
    grad = model.item_embedding.weight.grad
    assert grad[[3, 7, 11]].abs().sum() == 0 and grad[[0, 1, 2]].abs().sum() > 0
    # The restricted softmax equals a softmax over the trained items only.
    states = torch.randn(5, 8)
    table = model.item_vectors().detach()
    targets = torch.tensor([0, 1, 2, 4, 10])
    keep = torch.nonzero(seen).squeeze(1)
    expected = full_softmax_ce(states, table[keep], torch.searchsorted(keep, targets))
    torch.testing.assert_close(model.candidate_ce(states, table, targets), expected)
    negatives = model.sample_negatives(torch.tensor([0, 4, 10] * 300))
    assert set(negatives.tolist()) == set(keep.tolist())  # every trained item is drawn, no other
    assert not (negatives == torch.tensor([0, 4, 10] * 300)).any()


# ----------------------------------------------------------------------------- acceptance

@pytest.fixture(scope="module")
def cold_domain(tmp_path_factory) -> dict[str, Path]:
    """The tiny preset's downstream domain and its 20% cold-item split."""
    root = tmp_path_factory.mktemp("coldstart")
    domain_dir = tiny_downstream_domain(root)
    cold = root / "data" / "Scientific-cold"
    assert reolm_main(["split", "cold-items", str(domain_dir), "--fraction", "0.2", "--seed", "0",
                       "--out", str(cold)]) == 0
    return {"root": root, "warm": domain_dir, "cold": cold}


def test_acceptance_cold_split_sasrec_and_reolm_report_bucket_zero(cold_domain):
    from reolm.data.tokenizer import item_texts, train_tokenizer
    from reolm.random_init import init_backbone

    root, cold = cold_domain["root"], cold_domain["cold"]
    tok = train_tokenizer(item_texts([cold]), root / "tok", kind="wordpiece", vocab_size=2000)
    backbone = init_backbone(tok, root / "bert", size="tiny", max_position_embeddings=128)
    common = ["train.progress=false", "train.device=cpu", "eval.batch_size=64"]
    runs = {"sasrec": root / "sasrec", "reolm": root / "reolm", "pop": root / "pop"}

    def finetune(model: str, *args: str) -> int:
        return _finetune(["--domain", str(cold), "--out", str(runs[model]), "--model", model, *args, *common])

    assert finetune("sasrec", "train.epochs=2", "sasrec.hidden=16", "sasrec.blocks=1") == 0
    assert finetune("pop") == 0
    assert finetune("reolm", "--backbone", str(backbone), "reolm.model.num_adapters=2", "reolm.model.adapter_rank=8",
                    "reolm.model.max_tokens=128", "reolm.model.attention=sdpa", "reolm.negatives=16",
                    "reolm.item_batch_size=64", "reolm.stage1.epochs=1", "reolm.stage1.max_steps_per_epoch=2",
                    "reolm.stage1.batch_size=16", "reolm.stage2.epochs=1", "reolm.stage2.max_steps_per_epoch=2",
                    "reolm.stage2.batch_size=16") == 0
    domain = read_domain(cold)
    cold_targets = sum(1 for t in domain.test.values() if item_train_counts(domain)[t[0]] == 0)
    for name in ("sasrec", "reolm"):
        doc = read_metrics(runs[name] / "metrics.json")
        assert doc["setting"] == "cold-items" and doc["domain_splits"][0]["fraction"] == 0.2
        zero = doc["by_item_frequency"][0]
        assert zero["bucket"] == "0" and zero["users"] == cold_targets > 0, name
        assert sum(b["users"] for b in doc["by_item_frequency"]) == doc["num_users"]
    pop = read_metrics(runs["pop"] / "metrics.json")["by_item_frequency"][0]["metrics"]
    assert pop["NDCG@50"] == 0.0  # never-trained items all rank behind every counted one

    # SASRec: the rows of items unseen in training are exactly their initial values.
    seed_everything(42)
    fresh = build_baseline("sasrec", domain.num_items, SASRecConfig(hidden=16, blocks=1))
    trained = load_baseline(runs["sasrec"] / "best")
    unseen = item_train_counts(domain) == 0
    torch.testing.assert_close(trained.item_embedding.weight[:-1][unseen], fresh.item_embedding.weight[:-1][unseen])
    assert not torch.allclose(trained.item_embedding.weight[:-1][~unseen], fresh.item_embedding.weight[:-1][~unseen])

    docs = load_runs(runs.values())
    text = format_report(docs)
    assert "## Cold items" in text and "| Scientific | 0 times |" in text
    assert "only users whose target never occurs in training" in text
    data = report_json(docs)
    assert data["setting"] == "cold-items" and set(data["by_item_frequency"]["cold-items"]["Scientific"]) == {"sasrec", "pop", "reolm-nopretrain"}
