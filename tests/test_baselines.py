"""Baselines trained by the shared runner on a tiny learnable domain; saved runs re-evaluate exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from single_thread import one_thread  # noqa: F401  (autouse, module-scoped)

from conftest import make_domain
from reolm.baselines import build_baseline
from reolm.baselines.base import full_softmax_ce, pad_right
from reolm.baselines.config import BERT4RecConfig, GRU4RecConfig, SASRecConfig
from reolm.config import load_config
from reolm.data.domain import write_domain
from reolm.eval.contract import validate_metrics
from reolm.finetune.config import FinetuneConfig
from reolm.finetune.runner import run_finetune
from reolm.saved import get_trainer

ROOT = Path(__file__).resolve().parents[1]
_ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
FAST = ["train.epochs=10", "train.lr=1e-2", "train.batch_size=64", "train.patience=4", "train.progress=false",
        "eval.batch_size=128"]


@pytest.fixture(scope="module")
def domain_dir(tmp_path_factory) -> Path:
    # Each next item is 5 or 6 after the previous one (mod 60): learnable from the history,
    # invisible to popularity.
    return write_domain(make_domain("walk", num_users=200, num_items=60, min_len=6, max_len=12),
                        tmp_path_factory.mktemp("walk"))


@pytest.fixture(scope="module")
def runs(domain_dir, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = {}
    base = tmp_path_factory.mktemp("runs")
    for model, extra in (("pop", []), ("sasrec", []), ("gru4rec", []), ("bert4rec", ["train.epochs=15", "train.lr=3e-3", "train.patience=15",
                                                       "bert4rec.dropout=0.0"])):
        cfg = load_config(FinetuneConfig, None, FAST + extra + [f"model={model}"])
        out[model] = (base / model, run_finetune(cfg, domain_dir, base / model))
    return out


@pytest.mark.parametrize("model", ["sasrec", "gru4rec", "bert4rec"])
def test_learned_baseline_beats_popularity(runs, model):
    pop = runs["pop"][1]["metrics"]["NDCG@10"]
    learned = runs[model][1]["metrics"]["NDCG@10"]
    assert learned > 2 * pop and learned > pop + 0.1, (model, learned, pop)


def test_run_directory_contract(runs):
    run_dir, doc = runs["sasrec"]
    validate_metrics(json.loads((run_dir / "metrics.json").read_text()))
    assert doc["model"] == "sasrec" and doc["split"] == "test" and doc["domain"] == "walk"
    assert doc["num_items"] == 60 and doc["num_users"] == 200
    assert (run_dir / "config.yaml").is_file() and (run_dir / "best" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "train_loss" in r]
    assert epochs and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    # the kept weights are those of the best validation epoch
    best = max((r for r in records if "val" in r), key=lambda r: r["val"]["NDCG@10"])
    assert doc["best_epoch"] == best["epoch"] and doc["best_val"]["NDCG@10"] == pytest.approx(best["val"]["NDCG@10"])
    assert records[-1]["stage"] == "test"


@pytest.mark.parametrize("model", ["pop", "bert4rec"])
def test_evaluate_script_reproduces_run_test_metrics(runs, domain_dir, tmp_path, model):
    run_dir, doc = runs[model]
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), "--domain", str(domain_dir),
                           "--model", str(run_dir), "--split", "test", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, env=_ENV)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(out.read_text())
    validate_metrics(again, run=False)
    assert again["model"] == model
    for name, value in doc["metrics"].items():
        assert again["metrics"][name] == pytest.approx(value, abs=1e-9), name


def test_reolm_hook_is_registered_and_asks_for_its_weights(domain_dir, tmp_path):
    from reolm.finetune.reolm_trainer import train_reolm
    assert get_trainer("reolm") is train_reolm
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "finetune.py"), "--domain", str(domain_dir),
                           "--out", str(tmp_path / "r"), "--model", "reolm"],
                          capture_output=True, text=True, env=_ENV)
    assert proc.returncode == 1 and "--init EXPORT_DIR" in proc.stderr and "--backbone HF_DIR" in proc.stderr


@pytest.mark.parametrize("loss", ["ce", "bce"])
@pytest.mark.parametrize("name,section", [("sasrec", SASRecConfig), ("gru4rec", GRU4RecConfig)])
def test_next_item_losses_decrease_on_a_fixed_batch(name, section, loss):
    torch.manual_seed(0)
    model = build_baseline(name, 30, section(hidden=16, max_history_items=8, dropout=0.0, loss=loss))
    ids, lengths = pad_right([[1, 6, 11, 16, 21], [3, 8, 13], [0, 5]], model.pad_index)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss_value = model.training_loss(ids, lengths)
        first = first if first is not None else float(loss_value.detach())
        opt.zero_grad()
        loss_value.backward()
        opt.step()
    assert float(loss_value.detach()) < 0.6 * first


def test_user_vector_ignores_padding_and_old_items():
    torch.manual_seed(0)
    for model in (build_baseline("sasrec", 20, SASRecConfig(hidden=8, heads=2, max_history_items=4)),
                  build_baseline("gru4rec", 20, GRU4RecConfig(hidden=8, max_history_items=4)),
                  build_baseline("bert4rec", 20, BERT4RecConfig(hidden=8, heads=2, max_history_items=3))):
        model.eval()
        alone = model.user_vectors([[3, 4, 5]])
        batched = model.user_vectors([[3, 4, 5], [1, 2, 3, 4, 5, 6, 7, 8]])
        assert torch.allclose(alone[0], batched[0], atol=1e-6)   # padding of a longer row changes nothing
        longer = model.user_vectors([[9, 9, 9, 1, 2, 3, 4, 5]])
        cut = model.user_vectors([[1, 2, 3, 4, 5][-model.default_max_history:]])
        assert torch.allclose(longer, cut, atol=1e-6)             # only the last max_history_items count
        assert model.item_vectors().shape[0] == 20


def test_bert4rec_scores_include_output_bias():
    model = build_baseline("bert4rec", 10, BERT4RecConfig(hidden=8, heads=2, max_history_items=4))
    with torch.no_grad():
        model.output_bias[3] = 100.0
    scores = model.user_vectors([[1, 2]]) @ model.item_vectors().T
    assert int(scores.argmax()) == 3


def test_chunked_full_softmax_equals_dense_loss_and_gradients():
    torch.manual_seed(0)
    states = torch.randn(37, 8, requires_grad=True)
    table = torch.randn(50, 8, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    dense = torch.nn.functional.cross_entropy(states @ table.T + bias, targets)
    grads_dense = torch.autograd.grad(dense, (states, table, bias))
    chunked = full_softmax_ce(states, table, targets, bias, max_logits=50 * 5)  # 5 rows at a time
    grads_chunked = torch.autograd.grad(chunked, (states, table, bias))
    assert torch.allclose(chunked, dense, atol=1e-6)
    for a, b in zip(grads_chunked, grads_dense):
        assert torch.allclose(a, b, atol=1e-6)
