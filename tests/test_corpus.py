"""reolm.data.corpus: a corpus is opened through its manifest's checks; image tables are found by the
vision model that made them (reolm.data.tables.VisionIdentity); that identity travels with the model and fine-tuning refuses features
of another vision model (and loads an older export, which records none, with a warning)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import make_domain
from launch_helpers import TINY

from reolm.config import ConfigError, load_config
from reolm.data.corpus import Corpus
from reolm.data.domain import read_domain, write_domain
from reolm.data.shards import ShardError, ShardOptions, write_corpus
from reolm.data.synth import generate_corpus, preset_config
from reolm.data.tables import (UNKNOWN_VISION, ImageFeatureTable, TableError, VisionIdentity, VisionMismatch,
                               check_same_vision, load_tokenizer, recorded_vision, vision_record)
from reolm.train.config import PretrainConfig


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(preset_config("tiny", images=False), root / "synth", seed=1, progress=False)
    write_corpus([root / "synth" / "Garden"], root / "corpus", ShardOptions(max_count=40, progress=False))
    return root / "corpus"


def _image_table(corpus: Path, key: str, vision: str, dim: int, value: float) -> None:
    n = Corpus.open(corpus).num_items
    ImageFeatureTable(np.full((n, dim), value, np.float16), np.ones(n, bool), key, vision).save(
        corpus / "tables" / f"images-{key}")


def test_open_checks_the_manifest_format_version(corpus, tmp_path):
    opened = Corpus.open(corpus)
    assert opened.num_items > 0 and opened.attributes == ["category", "title", "brand"]
    assert all(Path(p).is_file() for p in opened.shards("train"))
    assert sum(opened.shard_counts().values()) == sum(e["count"] for entries in opened.manifest["shards"].values()
                                                      for e in entries)
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = json.loads((corpus / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ShardError, match="shard format version 99"):
        Corpus.open(bad)


def test_image_tables_are_found_by_the_vision_model_that_made_them(corpus, tmp_path):
    import shutil
    root = tmp_path / "corpus"
    shutil.copytree(corpus, root)
    assert Corpus.open(root).image_table() is None  # no image table: every item uses the void image
    _image_table(root, "aaaaaaaaaaaa", "/models/vit", 4, 1.0)
    only = Corpus.open(root).image_table()
    assert VisionIdentity.of_table(only) == VisionIdentity("aaaaaaaaaaaa", "/models/vit", 4)
    _image_table(root, "bbbbbbbbbbbb", "/models/clip", 4, 2.0)
    (root / "tables" / "images-cccccccccccc.partial").mkdir()  # a build in progress is no table
    opened = Corpus.open(root)
    with pytest.raises(TableError, match=r"several image tables \(images-aaaaaaaaaaaa \(/models/vit\), "
                                         r"images-bbbbbbbbbbbb \(/models/clip\)\)"):
        opened.image_table()
    assert float(opened.image_table("bbbbbbbbbbbb").features[0, 0]) == 2.0
    with pytest.raises(TableError, match="no image features of vision model dddddddddddd"):
        opened.image_table("dddddddddddd")

    # Pre-training takes the table data.image_table names and knows which vision model made it.
    from reolm.train.setup import resolve_tables
    from tiny_models import tiny_tables
    tokens, _ = tiny_tables(opened.num_items)
    tokens.save(tmp_path / "tokens")
    cfg = load_config(PretrainConfig, [str(TINY)], [f"data.corpus={root}", "model.image_feature_dim=4",
                                                    f"data.token_table={tmp_path / 'tokens'}",
                                                    f"data.image_table={root / 'tables' / 'images-aaaaaaaaaaaa'}"])
    tables = resolve_tables(cfg, None, opened)
    assert tables.vision == VisionIdentity("aaaaaaaaaaaa", "/models/vit", 4)
    assert float(tables.images.features[0, 0]) == 1.0

    # ... or the table of the vision model data.vision names (here by its table key).
    base = [f"data.corpus={root}", "model.image_feature_dim=4", f"data.token_table={tmp_path / 'tokens'}"]
    cfg = load_config(PretrainConfig, [str(TINY)], base + ["data.vision=bbbbbbbbbbbb"])
    tables = resolve_tables(cfg, None, opened)
    assert tables.vision == VisionIdentity("bbbbbbbbbbbb", "/models/clip", 4)
    assert float(tables.images.features[0, 0]) == 2.0
    with pytest.raises(TableError, match="no image features of vision model dddddddddddd"):
        resolve_tables(load_config(PretrainConfig, [str(TINY)], base + ["data.vision=dddddddddddd"]), None, opened)
    with pytest.raises(ConfigError, match="data.vision: .*nowhere is neither a vision model folder"):
        resolve_tables(load_config(PretrainConfig, [str(TINY)], base + [f"data.vision={tmp_path / 'nowhere'}"]),
                       None, opened)
    with pytest.raises(ConfigError, match="data.vision and data.image_table both choose"):
        load_config(PretrainConfig, [str(TINY)], base + ["data.vision=bbbbbbbbbbbb",
                                                          f"data.image_table={root / 'tables' / 'images-aaaaaaaaaaaa'}"])


def test_vision_records_and_the_check():
    vit, clip = VisionIdentity("aaaaaaaaaaaa", "/models/vit", 4), VisionIdentity("bbbbbbbbbbbb", "/models/clip", 4)
    assert recorded_vision(vision_record(vit), "x") == vit
    assert recorded_vision(vision_record(None), "x") is None        # trained without image features
    assert recorded_vision({}, "x") == UNKNOWN_VISION                # written before identities were kept
    with pytest.raises(TableError, match="key vision"):
        recorded_vision({"vision": "vit"}, "config.json")
    with pytest.raises(VisionMismatch, match=r"export E was trained on image features of vision model "
                                             r"aaaaaaaaaaaa \(/models/vit\), but the features of D come from "
                                             r"vision model bbbbbbbbbbbb \(/models/clip\)"):
        check_same_vision(vit, clip, "export E", "D")
    check_same_vision(vit, vit, "E", "D")
    check_same_vision(vit, UNKNOWN_VISION, "E", "D")  # imported features: only the width can be checked
    check_same_vision(None, clip, "E", "D")           # no image features in pre-training: nothing to compare


@pytest.fixture(scope="module")
def export_and_domains(tmp_path_factory) -> dict[str, Path]:
    """A tiny Reo-LM export and one domain whose image features each vision model computed."""
    from tiny_models import IMAGE_DIM, tiny_reolm, tiny_tokenizer

    root = tmp_path_factory.mktemp("vision_check")
    model, tokenizer = tiny_reolm(root / "backbone"), tiny_tokenizer()
    out = {}
    for name, key in (("vit", "aaaaaaaaaaaa"), ("clip", "bbbbbbbbbbbb")):
        domain = make_domain(num_items=12, num_users=6)
        domain.image_features = np.ones((domain.num_items, IMAGE_DIM), np.float16)
        domain.has_image = np.ones(domain.num_items, bool)
        folder = write_domain(domain, root / name)
        (folder / "image_features.json").write_text(json.dumps({"key": key, "vision": f"/models/{name}",
                                                                "dim": IMAGE_DIM}))
        out[name] = folder
    vit = VisionIdentity("aaaaaaaaaaaa", "/models/vit", IMAGE_DIM)
    out["export"] = model.save_pretrained(root / "export", tokenizer, extra_config=vision_record(vit))
    out["old_export"] = model.save_pretrained(root / "old_export", tokenizer)
    return out


def test_finetuning_refuses_image_features_of_another_vision_model(export_and_domains, caplog):
    from reolm.finetune.reolm_config import ReoLMSection
    from reolm.finetune.reolm_recommender import ReoLMRecommender
    from reolm.model import ReoLM

    paths = export_and_domains
    model = ReoLM.from_pretrained(paths["export"])
    section = ReoLMSection(init=str(paths["export"]))
    rec = ReoLMRecommender(model, load_tokenizer(paths["export"]), section=section, progress=False)
    assert rec.vision == VisionIdentity("aaaaaaaaaaaa", "/models/vit", 8)
    rec.bind(read_domain(paths["vit"]))  # the same vision model: fine
    with pytest.raises(VisionMismatch, match=f"the Reo-LM at {paths['export']} was trained on image features of "
                                             r"vision model aaaaaaaaaaaa \(/models/vit\).*come from vision model "
                                             r"bbbbbbbbbbbb \(/models/clip\)"):
        rec.bind(read_domain(paths["clip"]))

    # An export from before identities were recorded still binds, with a warning naming it.
    old = ReoLMRecommender(ReoLM.from_pretrained(paths["old_export"]), load_tokenizer(paths["old_export"]),
                           section=ReoLMSection(init=str(paths["old_export"])), progress=False)
    with caplog.at_level(logging.WARNING, logger="reolm.data.corpus"):
        old.bind(read_domain(paths["clip"]))
    assert old.num_items == 12
    assert any("records no vision model" in r.getMessage() and str(paths["old_export"]) in r.getMessage()
               for r in caplog.records)
