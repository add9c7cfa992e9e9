"""reolm/saved/: the model-kind registry and who may import what (end-to-end loading of every kind is
tested where each kind is trained: test_baselines, test_finetune_reolm, test_zeroshot, test_variants)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reolm.baselines import build_baseline
from reolm.baselines.popularity import Popularity
from reolm.finetune.config import MODEL_CHOICES
from reolm.saved import KINDS, PLM_ZEROSHOT, get_trainer, resolve
from reolm.saved.kinds import _function

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_loads_with_one_signature(name):
    kind = KINDS[name]
    inspect.signature(_function(kind.loader)).bind(Path("best"), None, None)  # load(folder, cfg, domain)
    assert kind.content == (kind.family != "id")
    if kind.trainer:
        assert callable(get_trainer(name))
    else:
        with pytest.raises(ValueError, match="not trained by itself"):
            get_trainer(name)


def test_trained_kinds_are_the_finetune_choices():
    assert {name for name, kind in KINDS.items() if kind.trainer} == set(MODEL_CHOICES)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        get_trainer("nope")


def test_id_models_bind_to_nothing(tiny_domain):
    for model in (build_baseline("sasrec", tiny_domain.num_items), Popularity(tiny_domain.num_items)):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert model.bind(tiny_domain) is model
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resolve_names_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="nor is it a Reo-LM export or a BERT/RoBERTa checkpoint"):
        resolve(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "reolm", "origin": "backbone"}')
    assert resolve(tmp_path).name == PLM_ZEROSHOT
    (tmp_path / "config.json").write_text('{"model_type": "reolm"}')
    assert resolve(tmp_path).name == "reolm-zeroshot" and resolve(tmp_path).kind.family == "reolm"


def _imports(folder: Path) -> dict[str, set[str]]:
    """file -> the modules it imports (at any level of the file)."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        found[str(path.relative_to(REPO))] = names
    return found


def test_layering():
    """serve/ and saved/ import nothing from finetune/ (saved/ names its loaders as strings, imported
    on use); the library never imports launch/."""
    for folder, banned in (("reolm/serve", "reolm.finetune"), ("reolm/saved", "reolm.finetune"),
                           ("reolm", "launch")):
        bad = {f: sorted(m for m in mods if m == banned or m.startswith(banned + "."))
               for f, mods in _imports(REPO / folder).items()}
        assert not {f: m for f, m in bad.items() if m}, f"{folder} imports {banned}"
    out = subprocess.run([sys.executable, "-c", "import sys, reolm.serve.app, reolm.serve.embed, reolm.saved; "
                          "print(sorted(m for m in sys.modules if m.startswith('reolm.finetune')))"],
                         capture_output=True, text=True, check=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


def test_a_folder_written_by_an_earlier_version_loads(tmp_path):
    """The format is unchanged: a descriptor as written before reolm/saved/ existed, by hand here."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    from reolm.baselines.config import SASRecConfig
    from reolm.saved import save_recommender

    model = build_baseline("sasrec", 12)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    old = {"format_version": 1, "model": "sasrec", "num_items": 12, "domain": "d",
           "model_config": dataclasses.asdict(SASRecConfig()), "epoch": 3, "val": {"ndcg@10": 0.5}}
    (tmp_path / "recommender.json").write_text(json.dumps(old, indent=2))
    loaded = resolve(tmp_path).load()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    again = save_recommender(tmp_path / "again", loaded, model_name="sasrec", num_items=12, domain="d",
                             model_config=dataclasses.asdict(SASRecConfig()), extra={"epoch": 3, "val": {"ndcg@10": 0.5}})
    assert (again / "recommender.json").read_text() == (tmp_path / "recommender.json").read_text()
