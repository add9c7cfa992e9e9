"""Token-table identity with a real-world tokenizer.json: one that configures truncation and
padding (as sentence-transformers checkpoints do), state transformers switches off on the first
call.  A table built by `reolm tables tokens` must be found again by pre-training, fine-tuning and
evaluation with a freshly loaded tokenizer, and a rebuild must say what changed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from single_thread import one_thread  # noqa: F401  (autouse, module-scoped)

from reolm.cli import main as reolm_main
from reolm.data.corpus import MissingTokenTable, find_token_table, source_attributes
from reolm.data.tables import load_tokenizer, tokenizer_identity, tokenizer_key

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "launch" / "configs" / "pretrain" / "tiny.yaml"


def _configure_truncation_and_padding(tokenizer_json: Path) -> None:
    """Rewrite a tokenizer.json with truncation and fixed padding to 128, like MiniLM's."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(max_length=128)
    tok.enable_padding(length=128, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    tok.save(str(tokenizer_json))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    from reolm.data.shards import ShardOptions, write_corpus
    from reolm.data.synth import generate_corpus, preset_config
    from reolm.data.tokenizer import item_texts, train_tokenizer
    from reolm.random_init import init_backbone

    root = tmp_path_factory.mktemp("tok_identity")
    cfg = preset_config("tiny", images=False)
    domains = generate_corpus(cfg, root / "data", seed=0, progress=False)
    roles = {d.name: d.role for d in cfg.domains}
    pretrain = [d for d in domains if roles[d.name] == "pretrain"]
    downstream = next(d for d in domains if roles[d.name] == "downstream")
    write_corpus(pretrain, root / "corpus", ShardOptions(max_count=50, progress=False))
    tok = train_tokenizer(item_texts([root / "corpus", downstream]), root / "tok", vocab_size=600, progress=False)
    backbone = init_backbone(tok, root / "bert", size="tiny", max_position_embeddings=256)
    _configure_truncation_and_padding(backbone / "tokenizer.json")
    assert json.loads((backbone / "tokenizer.json").read_text())["truncation"]["max_length"] == 128
    for flag, where in (("--corpus", root / "corpus"), ("--domain", downstream)):
        assert reolm_main(["tables", "tokens", "--tokenizer", str(backbone), flag, str(where), "--quiet"]) == 0
    return {"root": root, "corpus": root / "corpus", "domain": downstream, "backbone": backbone}


def _tables(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "tables").glob("tokens-*"))


def test_key_ignores_truncation_and_padding_state(assets):
    fresh = load_tokenizer(assets["backbone"])
    assert fresh.backend_tokenizer.truncation is not None  # the configured state is loaded ...
    before = tokenizer_key(fresh, ("title",), 32)
    fresh("some text")                                     # ... and cleared by the first call
    assert fresh.backend_tokenizer.truncation is None
    assert tokenizer_key(fresh, ("title",), 32) == before
    assert tokenizer_key(fresh, ("title",), 16) != before  # rendering settings are part of it


def test_cli_table_is_found_by_a_fresh_tokenizer_and_a_rebuild_says_why(assets):
    table = find_token_table(assets["corpus"], load_tokenizer(assets["backbone"]))
    assert len(table) > 0 and table.identity and set(table.identity) >= {"model", "normalizer", "rendering"}
    with pytest.raises(MissingTokenTable, match=r"differs in: rendering") as missing:
        find_token_table(assets["corpus"], load_tokenizer(assets["backbone"]), max_attr_tokens=8)
    assert missing.value.others and "reolm tables tokens" in str(missing.value)
    # Another normaliser (cased) tokenises differently: the table must not be reused.
    cased = load_tokenizer(assets["backbone"])
    from tokenizers import normalizers
    cased.backend_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    identity = tokenizer_identity(cased, source_attributes(assets["corpus"]), 32)
    assert identity["normalizer"] != table.identity["normalizer"] and identity["model"] == table.identity["model"]
    with pytest.raises(MissingTokenTable, match=r"differs in: normalizer$|differs in: normalizer\)"):
        find_token_table(assets["corpus"], cased)


def test_pretraining_uses_the_cli_table(assets):
    """The pre-training setup's item inputs (build_setup's tokenizer and tables) are the
    backbone's tokenizer and the CLI's table; the DeepSpeed run around them is covered by
    test_pretrain_runs."""
    from reolm.config import load_config
    from reolm.train.config import PretrainConfig
    from reolm.train.setup import item_inputs

    before = _tables(assets["corpus"])
    cfg = load_config(PretrainConfig, [str(TINY)], [f"data.corpus={assets['corpus']}",
                                                    f"model.backbone={assets['backbone']}"])
    tokenizer, _, tables = item_inputs(cfg)
    assert Path(tokenizer.name_or_path) == Path(assets["backbone"])
    assert tokenizer.get_vocab() == load_tokenizer(assets["backbone"]).get_vocab()
    tokens, images = tables.tokens, tables.images
    assert tokens.key == before[0].removeprefix("tokens-") and len(images) == len(tokens)
    assert _tables(assets["corpus"]) == before


def test_finetuning_and_evaluation_use_the_cli_table(assets, caplog):
    from launch_helpers import evaluate_main as evaluate, finetune_main as finetune

    before = _tables(assets["domain"])
    table_json = assets["domain"] / "tables" / before[0] / "table.json"
    mtime = table_json.stat().st_mtime_ns
    run = assets["root"] / "ft"
    caplog.set_level(logging.INFO, logger="reolm")
    assert finetune(["--domain", str(assets["domain"]), "--out", str(run), "--model", "reolm",
                     "--backbone", str(assets["backbone"]), "reolm.model.num_adapters=2",
                     "reolm.model.adapter_rank=4", "reolm.model.max_tokens=128", "reolm.model.attention=sdpa",
                     "reolm.model.image_feature_dim=8", "train.progress=false", "train.device=cpu",
                     "reolm.negatives=20", "reolm.stage1.epochs=1", "reolm.stage2.epochs=1",
                     "reolm.stage1.batch_size=64", "reolm.stage2.batch_size=64"]) == 0
    assert evaluate(["--domain", str(assets["domain"]), "--model", str(run), "--split", "val",
                     "--out", str(assets["root"] / "m.json"), "--device", "cpu", "--no-progress"]) == 0
    assert _tables(assets["domain"]) == before and table_json.stat().st_mtime_ns == mtime
    assert not [r for r in caplog.records if "building the token table" in r.getMessage()]
