"""The run's states save and load themselves through a real DeepSpeed checkpoint (one process): the
counters, the next generation, the stream positions and bad-sample counts come back into fresh
objects; the vision identity is recorded in trainer_state.json and in the export; a resume with
image features of another vision model is refused by build_setup before anything is written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from reolm.data.tables import ImageFeatureTable, ItemTables, VisionIdentity, VisionMismatch
from reolm.train.data import Readers, StreamPosition, StreamTracker

REPO = Path(__file__).resolve().parents[1]
VIT = VisionIdentity("aaaaaaaaaaaa", "/models/vit", 8)
READERS = Readers(rank=0, world_size=1, workers=1, replicate=False)


@pytest.fixture
def setup(tmp_path, world_of_one):
    """A TrainSetup around a real ZeRO-2 engine of a tiny Reo-LM (no data: state only), its
    checkpoints in RUN/checkpoints; its image features made by VIT."""
    import torch

    from reolm.train import distributed as D
    from reolm.train.checkpoint import CheckpointManager
    from reolm.train.checkpoint_files import run_layout
    from reolm.train.config import PretrainConfig
    from reolm.train.setup import BatchShape, Checkpoints, RankContext, TrainInputs, TrainSetup
    from tiny_models import tiny_tables, tiny_tokenizer, tiny_zero2_engine

    engine, _ = tiny_zero2_engine(tmp_path / "backbone")
    tokens, images = tiny_tables()
    cfg = PretrainConfig(run_dir=str(tmp_path / "run"))
    return TrainSetup(
        cfg=cfg, rank=RankContext(info=D.info(), device=torch.device("cpu"), precision="fp32", readers=READERS),
        inputs=TrainInputs(corpus=None, tables=ItemTables(tokens, images, VIT), tokenizer=tiny_tokenizer(),
                           collator=None),
        engine=engine, batch=BatchShape(micro=2, accum=1),
        checkpoints=Checkpoints(manager=CheckpointManager(cfg.checkpoint_dir()),
                                layout=run_layout(1, 2, False, 1, False, True), plan=None))


def _save(setup, state, streams) -> Path:
    """Register the run's states with the setup's manager and checkpoint them at ``state.step``."""
    from reolm.train.state import register_run_state
    register_run_state(setup, state, streams)
    return setup.checkpoints.manager.save(setup.engine, state.step)


def _resumed(setup, plan):
    """(trainer state, streams) of a fresh process resuming ``plan`` with ``setup``'s layout."""
    from reolm.train.checkpoint import CheckpointManager
    from reolm.train.state import TrainerState, register_run_state, resume

    fresh = dataclasses.replace(setup, checkpoints=dataclasses.replace(
        setup.checkpoints, manager=CheckpointManager(setup.cfg.checkpoint_dir()), plan=plan))
    state, streams = TrainerState(), StreamTracker(READERS)
    register_run_state(fresh, state, streams)
    assert resume(fresh) == (plan is not None)
    return state, streams


def test_trainer_state_and_streams_round_trip(setup, tmp_path):
    from reolm.train.export import export_checkpoint
    from reolm.train.state import TrainerState

    state = TrainerState(step=7, samples=112, tokens=3456, skipped_steps=2, generation=1)
    folder = _save(setup, state, StreamTracker(READERS, {0: StreamPosition(3, 9)}, {"decode": 2}))

    record = json.loads((folder / "trainer_state.json").read_text())
    assert {k: record[k] for k in ("step", "samples", "tokens", "skipped_steps", "generation")} == \
        {"step": 7, "samples": 112, "tokens": 3456, "skipped_steps": 2, "generation": 1}
    assert record["vision"] == {"key": "aaaaaaaaaaaa", "model": "/models/vit", "dim": 8}
    rank_file = json.loads((folder / "rank-00000.json").read_text())
    assert list(rank_file) == ["rank", "world_size", "rng", "data"]  # the layout earlier versions wrote
    assert rank_file["data"]["streams"] == {"0": {"draw": 3, "offset": 9}}
    with np.load(folder / "rank-00000.npz") as arrays:
        assert {"python_mt", "numpy_keys", "torch"} <= set(arrays.files)

    plan = setup.checkpoints.manager.plan("latest", setup.checkpoints.layout)
    assert plan.path == folder
    resumed, back = _resumed(setup, plan)
    assert resumed == TrainerState(step=7, samples=112, tokens=3456, skipped_steps=2, generation=2)
    assert back.positions == {0: StreamPosition(3, 9)} and back.bad_counts() == {"decode": 2}
    assert back.dormant == {}

    # The export carries the identity; a fresh start knows nothing.
    out = export_checkpoint(folder, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["vision"] == record["vision"]
    fresh, streams = _resumed(setup, None)
    assert fresh == TrainerState() and streams.positions == {}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_with_another_vision_model_is_refused(setup, tmp_path):
    """build_setup (the public path) refuses the resume before writing into the run directory;
    the same vision model resumes."""
    from launch_helpers import TINY

    from reolm.config import load_config
    from reolm.train.config import PretrainConfig
    from reolm.train.setup import build_setup
    from reolm.train.state import TrainerState

    folder = _save(setup, TrainerState(step=3), StreamTracker(READERS))
    tokens, features = setup.inputs.tables.tokens, setup.inputs.tables.images
    tokens.save(tmp_path / "tokens")
    for key, model in (("aaaaaaaaaaaa", "/models/vit"), ("bbbbbbbbbbbb", "/models/clip")):
        ImageFeatureTable(features.features, features.has_image, key, model).save(tmp_path / f"images-{key}")

    def config(image_key: str) -> PretrainConfig:
        return load_config(PretrainConfig, [str(TINY)], [
            f"run_dir={setup.cfg.run_dir}", f"model.backbone={tmp_path / 'backbone'}", "ckpt.resume=latest",
            f"data.token_table={tmp_path / 'tokens'}", f"data.image_table={tmp_path / f'images-{image_key}'}"])

    run_dir = Path(setup.cfg.run_dir)
    before = _snapshot(run_dir)
    with pytest.raises(VisionMismatch, match=r"checkpoint .*step-00000003 was trained on image features of "
                                             r"vision model aaaaaaaaaaaa .* vision model bbbbbbbbbbbb"):
        build_setup(config("bbbbbbbbbbbb"))
    assert _snapshot(run_dir) == before

    same = build_setup(config("aaaaaaaaaaaa"))
    assert same.checkpoints.plan.path == folder and same.inputs.tables.vision.key == "aaaaaaaaaaaa"
