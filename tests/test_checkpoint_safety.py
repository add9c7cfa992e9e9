"""Checkpoints are data and complete-or-not-at-all (in one process, with a real DeepSpeed engine).

* A payload (a pickle ``__reduce__`` that writes a marker file) planted in every ``.pt`` file of
  a real checkpoint, with the manifest rewritten to match, never runs: resume refuses naming the
  file and the global, DeepSpeed's own loader inside :func:`weights_only_loads` refuses it too
  (were the check bypassed), and export refuses it.  A pickle in our ``.npz`` is refused as well.
* Refused ``pytorch_model.bin`` weights get a plain message.
* The newest checkpoint with a missing rank file is reported by name and the previous one used;
  none complete is an error, never a fresh start.
* Resume plans: what cannot work is refused with a message naming the fix.
* Rank files keep the format earlier versions wrote; data streams re-split by global stream id.
* metrics.jsonl rows past the resumed step are moved aside.
"""

from __future__ import annotations

import builtins
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from reolm.train.checkpoint import CheckpointManager
from reolm.train.checkpoint_files import (CheckpointError, ResumePlan, complete_checkpoints, plan_resume,
                                          read_rank_states, resolve_resume, run_layout, step_tag, write_manifest,
                                          write_rank_states)
from reolm.train.data import Readers, StreamPosition, StreamTracker, merge_stream_states
from reolm.train.safe_load import UnsafeCheckpointError, weights_only_loads
from reolm.train.state import ProcessRNG

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this writes ``marker``: what an attacker's checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def _plant(path: Path, marker: Path) -> None:
    """Rewrite a torch.save file with the payload inside its top-level dict."""
    with weights_only_loads():
        obj = torch.load(path, map_location="cpu")
    obj = obj if isinstance(obj, dict) else {"original": obj}
    obj["__payload__"] = Payload(marker)
    torch.save(obj, path)


@pytest.fixture
def saved(tmp_path, world_of_one):
    """A real ZeRO-2 checkpoint of a tiny Reo-LM with our trainer state (what export needs)."""
    from reolm.config import to_dict
    from tiny_models import Held, tiny_zero2_engine

    engine, model = tiny_zero2_engine(tmp_path / "backbone")
    shared = {"step": 3, "backbone": model.backbone_config.to_dict(), "model": to_dict(model.config),
              "layout": run_layout(1, 2, False, 1, False, True)}
    ckpt = CheckpointManager(tmp_path / "ckpt")
    ckpt.register(shared={"trainer": Held(shared)},
                  per_rank={"rng": ProcessRNG(), "data": StreamTracker(_READERS, {0: StreamPosition(2, 5)})})
    path = ckpt.save(engine, 3)
    return engine, _fresh_manager(path)[0], path


_READERS = Readers(rank=0, world_size=1, workers=1, replicate=False)


def _fresh_manager(path: Path) -> tuple[CheckpointManager, StreamTracker]:
    """A manager of ``path``'s folder with fresh states registered (what a resumed run starts from)."""
    from tiny_models import Held
    streams = StreamTracker(_READERS)
    ckpt = CheckpointManager(path.parent)
    ckpt.register(shared={"trainer": Held()}, per_rank={"rng": ProcessRNG(), "data": streams})
    return ckpt, streams


def test_a_payload_in_every_checkpoint_file_never_runs(saved, tmp_path):
    from reolm.train.export import export_checkpoint

    engine, ckpt, path = saved
    marker = tmp_path / "PWNED"
    planted = sorted(path.rglob("*.pt"))
    assert len(planted) >= 2  # model states + ZeRO optimizer partition
    for file in planted:
        _plant(file, marker)
    write_manifest(path, 3, 1, 2)  # an attacker who can write files can rewrite the manifest too
    plan = ResumePlan(path, universal=False, same_layout=True)

    with pytest.raises(UnsafeCheckpointError, match=r"\.pt: refused, its pickle needs builtins\.exec"):
        ckpt.load(engine, plan)
    # Were the static check bypassed (a file swapped after it), DeepSpeed's loads are weights-only.
    with pytest.raises(UnsafeCheckpointError, match="weights-only loader: it needs (builtins.)?exec"):
        with weights_only_loads():
            engine.load_checkpoint(str(path.parent), tag=path.name)
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        export_checkpoint(path, tmp_path / "export")
    assert not marker.exists()
    assert not (tmp_path / "export").exists()


def test_a_pickle_in_our_rank_arrays_is_refused(saved, tmp_path):
    engine, ckpt, path = saved
    marker = tmp_path / "PWNED"
    np.savez(path / "rank-00000.npz", python_mt=np.array([Payload(marker)], dtype=object))
    write_manifest(path, 3, 1, 2)
    with pytest.raises(CheckpointError, match="rank 0 state unreadable.*allow_pickle"):
        ckpt.load(engine, ResumePlan(path, universal=False, same_layout=True))
    assert not marker.exists()


def test_clean_checkpoint_restores_rng_and_stream_positions(saved):
    engine, _, path = saved
    saved_rng = json.loads((path / "rank-00000.json").read_text())["rng"]
    torch.manual_seed(123)
    ckpt, streams = _fresh_manager(path)
    ckpt.load(engine, ResumePlan(path, universal=False, same_layout=True))
    assert streams.positions == {0: StreamPosition(2, 5)}
    assert saved_rng["numpy"]["pos"] == np.random.get_state()[2]


def test_rng_state_round_trips_as_plain_arrays():
    import random
    state = ProcessRNG().state_dict()
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    json.dumps({k: v for k, v in state.items() if k not in arrays})  # the scalars are JSON
    assert set(arrays) >= {"python_mt", "numpy_keys", "torch"}  # the names rank-R.npz has always used
    assert all(a.dtype != object for a in arrays.values())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    ProcessRNG().load_state_dict(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_refused_bin_weights_get_a_plain_message(tmp_path):
    from reolm.model.hf_checkpoint import CheckpointError as ModelCheckpointError, read_state_dict
    marker = tmp_path / "PWNED"
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(2, 2), "x": Payload(marker)},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelCheckpointError) as err:
        read_state_dict(tmp_path)
    message = str(err.value)
    assert "pytorch_model.bin: refused: it needs builtins.exec" in message
    assert "Weights only load failed" not in message and "UnpicklingError" not in message
    assert not marker.exists()


# ----------------------------------------------------------------------------- completeness

def _fake(folder: Path, step: int, world: int = 2) -> None:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": world}))
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    for rank in range(world):
        (folder / f"rank-{rank:05d}.json").write_text(json.dumps({"rank": rank}))
        np.savez(folder / f"rank-{rank:05d}.npz", x=np.zeros(1))
    write_manifest(folder, step, world, 2)


def test_checkpoint_rotation_and_incomplete_checkpoints_are_ignored(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        _fake(tmp_path / step_tag(step), step)
    # A save that died half-way (no rename) and a folder without a manifest.
    (tmp_path / (step_tag(40) + ".tmp")).mkdir()
    (tmp_path / step_tag(50)).mkdir()
    assert [p.name for p in complete_checkpoints(tmp_path)] == [step_tag(s) for s in (10, 20, 30)]
    assert resolve_resume("latest", tmp_path).name == step_tag(30)
    assert [p.name for p in ckpt.rotate()] == [step_tag(10)]
    assert [p.name for p in complete_checkpoints(tmp_path)] == [step_tag(20), step_tag(30)]
    assert resolve_resume("", tmp_path) is None
    assert resolve_resume("latest", tmp_path / "nothing") is None
    with pytest.raises(CheckpointError, match="not a complete checkpoint.*no manifest.json"):
        resolve_resume(str(tmp_path / step_tag(50)), tmp_path)


def test_an_incomplete_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog):
    for step in (10, 20):
        _fake(tmp_path / step_tag(step), step)
    (tmp_path / step_tag(20) / "rank-00001.json").unlink()  # a lost rank file
    with caplog.at_level(logging.WARNING, logger="reolm.train.checkpoint"):
        assert resolve_resume("latest", tmp_path).name == step_tag(10)
    assert f"checkpoint {tmp_path / step_tag(20)} is incomplete (rank-00001.json is missing)" in caplog.text
    # A truncated DeepSpeed file and a changed file of ours are caught by size / sha256.
    (tmp_path / step_tag(10) / "mp_rank_00_model_states.pt").write_bytes(b"x" * 5)
    with pytest.raises(CheckpointError, match=r"no complete checkpoint to resume from .*step-00000020: "
                                              r"rank-00001.json is missing; step-00000010: "
                                              r"mp_rank_00_model_states.pt has 5 bytes"):
        resolve_resume("latest", tmp_path)
    (tmp_path / step_tag(10) / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    (tmp_path / step_tag(10) / "rank-00000.json").write_text(json.dumps({"rank": 7}))
    with pytest.raises(CheckpointError, match="rank-00000.json does not match its sha256"):
        resolve_resume(str(tmp_path / step_tag(10)), tmp_path)
    # A rank file the manifest does not list (it was written for a smaller world) is not enough.
    manifest = json.loads((tmp_path / step_tag(20) / "manifest.json").read_text())
    del manifest["files"]["rank-00001.json"]
    (tmp_path / step_tag(20) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="rank-00001.json is not listed"):
        resolve_resume(str(tmp_path / step_tag(20)), tmp_path)


# ----------------------------------------------------------------------------- resume plans

def _with_layout(root: Path, **layout) -> Path:
    folder = root / step_tag(5)
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"layout": run_layout(**layout)}))
    return folder


def test_resume_plans(tmp_path):
    base = dict(world_size=2, zero_stage=2, offload=False, num_workers=1, replicate=False, resample=True)
    folder = _with_layout(tmp_path, **base)
    same = plan_resume(folder, run_layout(**base))
    assert not same.universal and same.same_layout
    shrink = plan_resume(folder, run_layout(**{**base, "world_size": 1}))
    assert shrink.universal and not shrink.same_layout
    more_workers = plan_resume(folder, run_layout(**{**base, "num_workers": 2}))
    assert not more_workers.universal and not more_workers.same_layout
    no_zero = _with_layout(tmp_path / "z0", **{**base, "zero_stage": 0})
    assert not plan_resume(no_zero, run_layout(**{**base, "zero_stage": 0, "world_size": 1})).universal
    with pytest.raises(CheckpointError, match="saved with ZeRO stage 2, this run uses stage 3: resume with "
                                              "dist.zero_stage=2"):
        plan_resume(folder, run_layout(**{**base, "zero_stage": 3}))
    with pytest.raises(CheckpointError, match="not supported with ZeRO optimizer offload"):
        plan_resume(folder, run_layout(**{**base, "world_size": 4, "offload": True}))
    with pytest.raises(CheckpointError, match="data.resample=false splits the shards among the 2 readers"):
        plan_resume(folder, run_layout(**{**base, "world_size": 1, "resample": False}))


def test_stream_states_merge_by_global_id_keeping_the_furthest_position():
    positions, bad = merge_stream_states([
        {"streams": {"0": {"draw": 3, "offset": 1}, "2": {"draw": 1, "offset": 9}}, "bad": {"tar": 2}},
        {"streams": {"1": {"draw": 0, "offset": 4}, "2": {"draw": 2, "offset": 0}}, "bad": {"tar": 1, "short": 1}}])
    assert positions == {0: {"draw": 3, "offset": 1}, 1: {"draw": 0, "offset": 4}, 2: {"draw": 2, "offset": 0}}
    assert bad == {"tar": 3, "short": 1}


def test_rank_files_keep_the_format_earlier_versions_wrote(tmp_path):
    """rank-R.json holds each per-rank state under its name, rank-R.npz the RNG's arrays by their own
    names: a pair written by hand the way the writer before the Stateful protocol did reads back,
    and the writer now produces the same pair."""
    rng = ProcessRNG().state_dict()
    arrays = {k: v for k, v in rng.items() if isinstance(v, np.ndarray)}
    meta = {k: v for k, v in rng.items() if k not in arrays}
    data = {"num_workers": 1, "streams": {"0": {"draw": 2, "offset": 5}}, "bad": {"tar": 1}}
    old = tmp_path / "old"
    old.mkdir()
    np.savez(old / "rank-00000.npz", **arrays)
    (old / "rank-00000.json").write_text(json.dumps({"rank": 0, "world_size": 1, "rng": meta, "data": data}))
    back = read_rank_states(old, 0)
    assert back["data"] == data and set(back["rng"]) == set(rng)
    assert all(np.array_equal(back["rng"][k], v) for k, v in arrays.items())

    new = tmp_path / "new"
    new.mkdir()
    write_rank_states(new, 0, 1, {"rng": rng, "data": data})
    assert json.loads((new / "rank-00000.json").read_text()) == json.loads((old / "rank-00000.json").read_text())
    with np.load(new / "rank-00000.npz") as written:
        assert sorted(written.files) == sorted(arrays)
    with pytest.raises(CheckpointError, match="per-rank state 'data' holds arrays"):
        write_rank_states(new, 0, 1, {"data": {"x": np.zeros(2)}})


def test_streams_reshard_by_global_id_and_rank_zero_keeps_the_dormant_ones():
    """2 ranks -> 1 rank -> 2 ranks (one worker each): the stream of the vanished rank stays dormant
    on rank 0 and continues on rank 1 when the run grows again; bad-sample totals are counted once."""
    saved = [{"num_workers": 1, "streams": {"0": {"draw": 3, "offset": 1}}, "bad": {"tar": 2}},
             {"num_workers": 1, "streams": {"1": {"draw": 5, "offset": 4}}, "bad": {"tar": 1}}]
    alone = StreamTracker(Readers(rank=0, world_size=1, workers=1, replicate=False))
    alone.load_state_dict(alone.reshard(saved))
    assert alone.positions == {0: StreamPosition(3, 1)} and alone.bad_counts() == {"tar": 3}
    assert alone.state_dict()["streams"] == {"0": {"draw": 3, "offset": 1}, "1": {"draw": 5, "offset": 4}}

    grown = [StreamTracker(Readers(rank=r, world_size=2, workers=1, replicate=False)) for r in range(2)]
    for tracker in grown:
        tracker.load_state_dict(tracker.reshard([alone.state_dict()]))
    assert [t.positions for t in grown] == [{0: StreamPosition(3, 1)}, {0: StreamPosition(5, 4)}]  # by worker
    assert [t.bad_counts() for t in grown] == [{"tar": 3}, {}] and [t.dormant for t in grown] == [{}, {}]


def test_metrics_rows_after_the_resumed_step_are_moved_aside(tmp_path):
    from reolm.train.metrics import move_rows_after
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "kind": "train"} for s in (5, 10, 15)] + [{"step": 10, "kind": "val"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2')  # a line cut by a kill
    assert move_rows_after(path, 10) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10, 10]
    aside = (tmp_path / "metrics.after-resume.jsonl").read_text().splitlines()
    assert json.loads(aside[0])["step"] == 15 and aside[1] == '{"step": 2'
    assert move_rows_after(path, 10) == 0 and move_rows_after(tmp_path / "none.jsonl", 0) == 0
