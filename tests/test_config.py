from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from reolm.config import ConfigError, apply_overrides, describe, load_config, param, save_resolved


@dataclass
class Optim:
    """Optimiser settings."""
    lr: float = param(5e-5, "Peak learning rate.", gt=0)
    schedule: str = param("cosine", "Decay shape.", choices=("cosine", "linear"))
    betas: list[float] = param([0.9, 0.999], "Adam betas.", ge=0, lt=1)


@dataclass
class Run:
    """A run."""
    name: str = param("run", "Run name.")
    steps: int = param(100, "Optimizer steps.", ge=1)
    bf16: bool = param(True, "Use bf16.")
    note: str | None = param(None, "Free text.")
    optim: Optim = field(default_factory=Optim)

    def check(self) -> None:
        if self.name == "forbidden":
            raise ConfigError("name: 'forbidden' is reserved")


def test_defaults_files_and_overrides_in_order(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text(yaml.safe_dump({"steps": 10, "optim": {"lr": 1e-3}}))
    cfg = load_config(Run, f, ["optim.lr=2e-4", "bf16=false", "optim.betas=[0.8,0.9]"])
    assert cfg.steps == 10
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.bf16 is False
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.optim.schedule == "cosine"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "did you mean optim.lr"),
    ("steps=abc", "expected an integer"),
    ("steps=1.5", "expected an integer"),
    ("steps=0", "must be >= 1"),
    ("optim.schedule=step", "not one of"),
    ("optim.betas=[0.9,1.0]", "must be < 1"),
    ("bf16=maybe", "expected true/false"),
    ("name=forbidden", "reserved"),
    ("noequals", "key=value"),
])
def test_bad_values_give_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Run, None, [override])


def test_unknown_key_in_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*optim.warmup"):
        load_config(Run, f)


def test_save_resolved_round_trips(tmp_path):
    cfg = apply_overrides(Run(), ["steps=7", "note=hello"])
    path = save_resolved(cfg, tmp_path / "run")
    again = load_config(Run, path)
    assert again == cfg


def test_describe_lists_every_key_with_docs():
    lines = describe(Run).splitlines()
    docs = {"name": "Run name.", "steps": "Optimizer steps.", "bf16": "Use bf16.", "note": "Free text.",
            "optim.lr": "Peak learning rate.", "optim.schedule": "Decay shape.", "optim.betas": "Adam betas."}
    assert {line.split(" (")[0].strip() for line in lines if line.startswith("  ")} == docs.keys()
    for key, doc in docs.items():  # every key of Run, each on its own line with its doc
        (line,) = [line for line in lines if line.strip().startswith(f"{key} (")]
        assert doc in line, line
    assert "one of ['cosine', 'linear']" in next(line for line in lines if "optim.schedule (" in line)
    assert any(line.startswith("[optim] Optimiser settings.") for line in lines)


def test_help_shows_the_defaults_of_nested_sections():
    from reolm.config import config_help_epilog
    from reolm.finetune.config import FinetuneConfig

    text = config_help_epilog(FinetuneConfig)
    # ReoLMSection builds ModelConfig(top_routing="gate"); ModelConfig alone says "domain".
    assert "reolm.model.top_routing (str, default 'gate')" in text
    assert "reolm.model.gradient_checkpointing (bool | None, default None)" in text


# ----------------------------------------------------------------------------- renamed keys

@pytest.mark.parametrize("override, new", [
    ("reolm.max_history=5", "reolm.max_history_items"),
    ("reolm.eval_max_history=5", "reolm.eval_max_history_items"),
    ("eval.max_history=5", "eval.max_history_items"),
    ("sasrec.max_len=20", "sasrec.max_history_items"),
    ("gru4rec.max_len=20", "gru4rec.max_history_items"),
    ("reolm.model.max_items=20", "reolm.model.max_history_items"),
])
def test_old_history_keys_name_their_new_name(override, new):
    from reolm.finetune.config import FinetuneConfig
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]} was renamed to {new}$"):
        load_config(FinetuneConfig, None, [override])
    with pytest.raises(ConfigError, match=rf"{new}"):  # apply_overrides checks the same way
        apply_overrides(FinetuneConfig(), [override])


@pytest.mark.parametrize("kind, text, message", [
    ("finetune", "bert4rec:\n  max_len: 50\n",
     r"config key bert4rec.max_len was renamed to bert4rec.max_history_items \(= max_len - 1"),
    ("pretrain", "model:\n  max_items: 20\n", r"config key model.max_items was renamed to model.max_history_items$"),
])
def test_old_history_key_in_a_file_names_the_file_and_what_changed(tmp_path, kind, text, message):
    from reolm.finetune.config import FinetuneConfig
    from reolm.train.config import PretrainConfig
    f = tmp_path / "old.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=r"old.yaml: " + message):
        load_config({"finetune": FinetuneConfig, "pretrain": PretrainConfig}[kind], f)


def test_a_run_saved_with_the_old_keys_is_read_back_upgraded(tmp_path):
    from reolm.baselines.config import BERT4RecConfig
    from reolm.config import from_dict, load_saved_config
    from reolm.finetune.config import FinetuneConfig
    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump({"model": "bert4rec", "eval": {"max_history": 7, "batch_size": 3},
                                   "reolm": {"max_history": 4, "eval_max_history": 6,
                                             "model": {"attention": "sdpa"}},
                                   "bert4rec": {"max_len": 20}, "sasrec": {"max_len": 30}}))
    cfg = load_saved_config(FinetuneConfig, old, ["eval.batch_size=5"])
    assert (cfg.eval.max_history_items, cfg.eval.batch_size) == (7, 5)
    assert (cfg.reolm.max_history_items, cfg.reolm.eval_max_history_items) == (4, 6)
    assert cfg.reolm.model.top_routing == "gate"  # the section's own default, not ModelConfig's
    assert (cfg.bert4rec.max_history_items, cfg.sasrec.max_history_items) == (19, 30)  # [MASK] not counted
    assert from_dict(BERT4RecConfig, {"max_len": 50}).max_history_items == 49  # a saved model's settings
    with pytest.raises(ConfigError, match="both set"):
        from_dict(BERT4RecConfig, {"max_len": 50, "max_history_items": 49})
    with pytest.raises(ConfigError, match="renamed to eval.max_history_items"):
        load_saved_config(FinetuneConfig, old, ["eval.max_history=3"])  # overrides are user input


def test_configs_are_frozen_after_loading():
    import dataclasses
    from reolm.finetune.config import FinetuneConfig
    from reolm.train.config import PretrainConfig
    for cfg, key in ((load_config(FinetuneConfig), "model"), (load_config(PretrainConfig), "seed")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, key, getattr(cfg, key))
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config(FinetuneConfig).reolm.stage1.lr = 1.0


def test_old_model_max_items_is_refused_in_pretraining_overrides():
    from reolm.train.config import PretrainConfig
    with pytest.raises(ConfigError, match=r"model.max_items was renamed to model.max_history_items$"):
        load_config(PretrainConfig, None, ["model.max_items=20"])
    assert load_config(PretrainConfig, None, ["model.max_history_items=20"]).model.max_history_items == 20


def test_runs_and_models_saved_with_model_max_items_are_read_back_upgraded(tmp_path):
    """A pre-training config, a fine-tuning run's config.yaml, a checkpoint's or a saved model's
    settings (``from_dict``) written before the rename read back with the new key."""
    from reolm.config import from_dict, load_saved_config
    from reolm.finetune.config import FinetuneConfig
    from reolm.finetune.reolm_config import ReoLMSection
    from reolm.model import ModelConfig
    from reolm.train.config import PretrainConfig

    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump({"model": {"max_items": 12, "max_tokens": 256}}))
    assert load_saved_config(PretrainConfig, old).model.max_history_items == 12
    old.write_text(yaml.safe_dump({"model": "reolm", "reolm": {"model": {"max_items": 7}, "max_history": 4}}))
    cfg = load_saved_config(FinetuneConfig, old)
    assert (cfg.reolm.model.max_history_items, cfg.reolm.max_history_items) == (7, 4)
    assert from_dict(ModelConfig, {"max_items": 9}).max_history_items == 9  # a checkpoint's "model" record
    assert from_dict(ReoLMSection, {"model": {"max_items": 9}}).model.max_history_items == 9  # a saved model
    with pytest.raises(ConfigError, match="both set"):
        from_dict(ModelConfig, {"max_items": 9, "max_history_items": 9})
    with pytest.raises(ConfigError, match="renamed to reolm.model.max_history_items"):
        load_saved_config(FinetuneConfig, old, ["reolm.model.max_items=3"])  # overrides are user input


def test_model_config_is_frozen():
    import dataclasses
    from reolm.model import ModelConfig
    cfg = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_history_items = 3
    assert dataclasses.replace(cfg, max_history_items=3).max_history_items == 3 and cfg.max_history_items == 50
