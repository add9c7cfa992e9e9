"""TrainerState and DataStreams save and load themselves through a real DeepSpeed checkpoint (one
process): the counters, the next generation, the stream positions and bad-sample counts come back;
the vision identity is recorded in trainer_state.json and in the export; a resume with image
features of another vision model is refused before anything is written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from reolm.data.corpus import VisionIdentity, VisionMismatch
from reolm.train.data import StreamPosition, StreamTracker

REPO = Path(__file__).resolve().parents[1]
VIT = VisionIdentity("aaaaaaaaaaaa", "/models/vit", 8)


@pytest.fixture
def setup(tmp_path, world_of_one):
    """A TrainSetup around a real ZeRO-2 engine of a tiny Reo-LM (no data: state only)."""
    import torch

    from reolm.train import distributed as D
    from reolm.train.checkpoint import CheckpointManager, run_layout
    from reolm.train.config import PretrainConfig
    from reolm.train.setup import TrainSetup
    from tiny_models import tiny_tables, tiny_zero2_engine

    engine, _ = tiny_zero2_engine(tmp_path / "backbone")
    tokens, images = tiny_tables()
    cfg = PretrainConfig(run_dir=str(tmp_path / "run"))
    return TrainSetup(cfg, D.info(), torch.device("cpu"), engine, None, tokens, images, len(tokens), 1, 2, "fp32",
                      1, CheckpointManager(tmp_path / "ckpt"), run_layout(1, 2, False, 1, False, True), None,
                      None, VIT)


def test_trainer_state_and_streams_round_trip(setup, tmp_path):
    from reolm.train.export import export_checkpoint
    from reolm.train.state import DataStreams, TrainerState

    state = TrainerState(step=7, samples=112, tokens=3456, skipped_steps=2, generation=1)
    streams = DataStreams(StreamTracker(1, {0: StreamPosition(3, 9)}, {"decode": 2}))
    folder = state.save(setup, streams)

    record = json.loads((folder / "trainer_state.json").read_text())
    assert {k: record[k] for k in ("step", "samples", "tokens", "skipped_steps", "generation")} == \
        {"step": 7, "samples": 112, "tokens": 3456, "skipped_steps": 2, "generation": 1}
    assert record["vision"] == {"key": "aaaaaaaaaaaa", "model": "/models/vit", "dim": 8}
    assert json.loads((folder / "rank-00000.json").read_text())["data"]["streams"] == {"0": {"draw": 3, "offset": 9}}

    plan = setup.ckpt.plan("latest", setup.layout)
    assert plan.path == folder
    resumed, restored = TrainerState.resume(dataclasses.replace(setup, plan=plan))
    assert resumed == TrainerState(step=7, samples=112, tokens=3456, skipped_steps=2, generation=2)
    back = DataStreams.restore(setup, restored)
    assert back.tracker.positions == {0: StreamPosition(3, 9)} and back.tracker.bad_counts() == {"decode": 2}
    assert back.dormant == {}

    # The export carries the identity; a fresh start knows nothing.
    out = export_checkpoint(folder, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["vision"] == record["vision"]
    assert TrainerState.resume(setup) == (TrainerState(), None)


def test_resume_with_another_vision_model_is_refused(setup):
    from reolm.train.setup import _check_resumed_vision
    from reolm.train.state import DataStreams, TrainerState

    TrainerState(step=3).save(setup, DataStreams(StreamTracker(1)))
    plan = setup.ckpt.plan("latest", setup.layout)
    _check_resumed_vision(plan, VIT)
    _check_resumed_vision(plan, None)  # no image features now: nothing to compare
    with pytest.raises(VisionMismatch, match=r"checkpoint .*step-00000003 was trained on image features of "
                                             r"vision model aaaaaaaaaaaa .* vision model bbbbbbbbbbbb"):
        _check_resumed_vision(plan, VisionIdentity("bbbbbbbbbbbb", "/models/clip", 8))
