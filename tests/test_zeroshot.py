"""Zero-shot evaluation of a plain HF checkpoint (``plm-zeroshot``), its Reo-LM export
(``reolm export backbone``) and reproducible user subsets (``--max-users N --seed S``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_domain
from single_thread import one_thread  # noqa: F401  (autouse, module-scoped)

from reolm.cli import main as reolm_main
from reolm.data.domain import read_domain, write_domain
from reolm.eval.contract import read_metrics
from reolm.eval.evaluate import sample_users, split_examples
from reolm.finetune.config import FinetuneConfig
from reolm.finetune.reolm_trainer import build_finetune_model

SMALL = ["reolm.model.max_tokens=128", "reolm.model.num_adapters=2", "reolm.model.adapter_rank=4"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    from reolm.data.tokenizer import item_texts, train_tokenizer
    from reolm.random_init import init_backbone

    root = tmp_path_factory.mktemp("zeroshot")
    domain = write_domain(make_domain("zs", num_users=40, num_items=30), root / "zs")
    tok = train_tokenizer(item_texts([domain]), root / "tok", vocab_size=200, progress=False)
    return {"root": root, "domain": domain, "backbone": init_backbone(tok, root / "bert", size="tiny",
                                                                        max_position_embeddings=128)}


def _evaluate(assets, model: Path, out: str, *extra: str) -> dict:
    from launch_helpers import evaluate_main as main
    path = assets["root"] / out
    assert main(["--domain", str(assets["domain"]), "--model", str(model), "--split", "test", "--out", str(path),
                 "--device", "cpu", "--no-progress", *extra]) == 0
    return read_metrics(path, run=False)


def test_hf_checkpoint_evaluates_zero_shot_like_its_export(assets, capsys):
    plm = _evaluate(assets, assets["backbone"], "plm.json", *SMALL)
    assert plm["model"] == "plm-zeroshot" and plm["num_users"] == 40 and "user_subset" not in plm
    assert "encode items" not in capsys.readouterr().err  # --no-progress reaches item encoding
    again = _evaluate(assets, assets["backbone"], "plm2.json", *SMALL)
    assert again["metrics"] == plm["metrics"]  # the untrained image token is seeded
    export = assets["root"] / "export"
    assert reolm_main(["export", "backbone", str(assets["backbone"]), str(export), "max_tokens=128",
                       "num_adapters=2", "adapter_rank=4"]) == 0
    assert json.loads((export / "config.json").read_text())["origin"] == "backbone"
    exported = _evaluate(assets, export, "export.json")
    assert exported["model"] == "plm-zeroshot"
    for name, value in plm["metrics"].items():
        assert exported["metrics"][name] == pytest.approx(value, abs=1e-9), name
    # Fine-tuning from such an export is no pre-trained run.
    _, name = build_finetune_model(FinetuneConfig(model="reolm"), read_domain(assets["domain"]), str(export), None)
    assert name == "reolm-nopretrain"


def test_user_subset_is_reproducible_and_recorded(assets):
    doc = _evaluate(assets, assets["backbone"], "sub.json", "--max-users", "12", "--seed", "3", *SMALL)
    assert doc["num_users"] == 12 and doc["user_subset"] == {"max_users": 12, "seed": 3, "of_users": 40}
    assert _evaluate(assets, assets["backbone"], "sub2.json", "--max-users", "12", "--seed", "3",
                     *SMALL)["metrics"] == doc["metrics"]
    examples = split_examples(read_domain(assets["domain"]), "test")
    a, b = sample_users(examples, 12, 3), sample_users(examples, 12, 4)
    assert a.users == sorted(a.users) and len(set(a.users)) == 12 and set(a.users) <= set(examples.users)
    assert a.users != b.users and sample_users(examples, 12, 3).users == a.users
    assert a.targets == [examples.targets[examples.users.index(u)] for u in a.users]
    assert sample_users(examples, 0, 0) is examples and sample_users(examples, 99, 0) is examples


def test_neither_run_nor_checkpoint_is_a_clear_error(assets, tmp_path, capsys):
    from launch_helpers import evaluate_main as main
    assert main(["--domain", str(assets["domain"]), "--model", str(tmp_path), "--out", str(tmp_path / "m.json"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "BERT/RoBERTa checkpoint" in err


def test_validation_subset_bounds_validation_only(assets):
    """eval.val_max_users: validation (early stopping) on a seeded subset, test on max_users' users."""
    from reolm.eval.evaluate import evaluate_recommender
    from reolm.finetune.config import EvalSection
    from reolm.finetune.runner import evaluate_split
    from reolm.baselines.popularity import Popularity

    domain = read_domain(assets["domain"])
    model = Popularity(domain.num_items).fit(domain.train.values())
    cfg = EvalSection(val_max_users=12, subset_seed=3)
    val, test = evaluate_split(model, domain, "val", cfg), evaluate_split(model, domain, "test", cfg)
    assert (val.num_users, test.num_users) == (12, 40)
    direct = evaluate_recommender(model, domain, "val", max_users=12, seed=3, progress=False)
    assert val.metrics == direct.metrics  # the same 12 users as an explicit subset
    both = evaluate_split(model, domain, "test", EvalSection(max_users=20, val_max_users=12))
    assert both.num_users == 20
