"""bench/real_transfer.py: the stage plan puts every model on the same protocol (no data needed)."""

from __future__ import annotations

import io
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


@pytest.mark.parametrize("budget", sorted(real_transfer.BUDGETS))
def test_every_target_model_gets_the_same_domain_and_users(tmp_path, budget):
    stages, models = plan(tmp_path, budget)
    b = real_transfer.BUDGETS[budget]
    assert set(models) == {"zero-shot", "reolm", "reolm-nopretrain", "sasrec", "gru4rec", "bert4rec", "pop"}
    target_runs = [s for s in stages if "launch/finetune.py" in " ".join(s.argv) or "launch/evaluate.py" in
                   " ".join(s.argv)]
    assert len(target_runs) == len(models)
    subset = [f"eval.max_users={b.eval_users}", f"eval.subset_seed={b.eval_seed}"]
    for stage in target_runs:
        argv = stage.argv
        assert argv[argv.index("--domain") + 1] == str(tmp_path / "run" / "domains" / "Tools")
        assert argv[-2:] == subset
        if "launch/finetune.py" in argv[1]:
            assert argv[argv.index("--config") + 1] == str(REPO / b.finetune_config)
    pretrain = next(s for s in stages if "launch/pretrain.py" in " ".join(s.argv))
    assert Path(pretrain.argv[0]).name == "deepspeed" and "--num_gpus" in pretrain.argv
    shard = next(s for s in stages if s.argv[3:4] == ["shard"])
    assert [Path(a).name for a in shard.argv[-3:]] == ["Electronics", "Sports", "Toys"]  # the target is not sharded
    # The budget's configs load and agree on the adapter shape, so both Reo-LM runs are comparable.
    pre = load_config(PretrainConfig, [REPO / b.pretrain_config])
    ft = load_config(FinetuneConfig, [REPO / b.finetune_config])
    assert (pre.model.num_adapters, pre.model.adapter_rank) == (ft.reolm.model.num_adapters,
                                                                ft.reolm.model.adapter_rank)


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
