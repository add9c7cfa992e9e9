"""Elastic resume through the real `deepspeed` launcher (CPU, gloo): a run checkpointed on N ranks
continues on M ranks through DeepSpeed's universal checkpoints.

Each test trains a few steps, resumes from an explicit earlier checkpoint on another number of
ranks (so the killed-after-checkpoint metrics rows exist and must move aside), and checks: the
step counter, samples seen and the lr schedule continue; the data streams are re-split with no
(stream, draw, sample) position trained twice and every continuing stream resuming at its saved
position; dormant streams survive a shrink and continue after a grow; a resume that cannot work
fails before anything in the run directory is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from reolm.config import load_config
from reolm.train.config import PretrainConfig
from reolm.optim import lr_factor

from launch_helpers import PRETRAIN, TINY, base_overrides, deepspeed_cmd, metrics, run_logged

pytestmark = pytest.mark.slow

STEPS_PER_SEGMENT = 4
MICRO = 16  # tiny.yaml's optim.micro_batch_size (grad_accum 1)


def _position(key: str) -> tuple[int, int, int]:
    """(stream, draw, index) of a consumed sample key ``s{stream}/d{draw}/i{index}/{tar key}``."""
    stream, draw, index = key.split("/")[:3]
    return int(stream[1:]), int(draw[1:]), int(index[1:])


class Run:
    """One run directory resumed across launches with different world sizes."""

    def __init__(self, inputs, tmp_path: Path, stage: int) -> None:
        self.dir = tmp_path / "run"
        self.log = tmp_path / "log.txt"
        self.overrides = base_overrides(inputs, self.dir, **{
            "val.every": 0, "log.every": 2, "optim.schedule": "linear", "optim.warmup_steps": 2,
            "optim.lr": "1e-2", "data.record_keys": "true", "ckpt.every": 2, "ckpt.keep_last": 10,
            "dist.ds_config": f"ds_configs/zero{stage}.json"})
        self.segments: list[tuple[int, int, dict[str, int]]] = []  # (world, last step, tsv offsets)

    def ckpt(self, step: int) -> Path:
        return self.dir / "checkpoints" / f"step-{step:08d}"

    def offsets(self) -> dict[str, int]:
        folder = self.dir / "consumed"
        return {p.name: p.stat().st_size for p in folder.glob("rank-*.tsv")} if folder.is_dir() else {}

    def train(self, world: int, steps: int, resume: int | None = None) -> None:
        extra = [f"optim.steps={steps}"] + ([f"ckpt.resume={self.ckpt(resume)}"] if resume is not None else [])
        self.segments.append((world, steps, self.offsets()))
        run_logged(deepspeed_cmd(world, self.overrides + extra), self.log)

    def trained(self, segment: int) -> list[tuple[int, tuple[int, int, int]]]:
        """(step, sample position) of every sample the ``segment``-th launch trained on."""
        start = self.segments[segment][2]
        end = self.segments[segment + 1][2] if segment + 1 < len(self.segments) else self.offsets()
        out = []
        for name, size in end.items():
            text = (self.dir / "consumed" / name).read_bytes()[start.get(name, 0):size].decode()
            for line in text.splitlines():
                step, key = line.split("\t")
                out.append((int(step), _position(key)))
        return out

    def streams(self, step: int) -> dict[int, tuple[int, int]]:
        """Saved stream positions of a checkpoint, merged over its rank files."""
        out = {}
        for path in sorted(self.ckpt(step).glob("rank-*.json")):
            for sid, pos in json.loads(path.read_text())["data"]["streams"].items():
                out[int(sid)] = (pos["draw"], pos["offset"])
        return out


def _check_resume(run: Run, segment: int, resumed_from: int) -> None:
    """The ``segment``-th launch resumed ``resumed_from``: counters, lr and streams continue."""
    world_before = run.segments[segment - 1][0]
    world, last, _ = run.segments[segment]
    rows = metrics(run.dir)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"metrics steps not monotonic: {steps}"
    # Samples seen: every step adds micro x world of the layout that took it.
    samples = {r["step"]: r["samples_seen"] for r in rows}
    assert samples[last] - samples[resumed_from] == (last - resumed_from) * MICRO * world
    # The lr schedule continues: every resumed step has the lr of its step in the schedule (a
    # scheduler restarted from zero would give the warmup's values).
    optim = load_config(PretrainConfig, [str(TINY)], run.overrides + [f"optim.steps={last}"]).optim
    resumed_rows = [r for r in rows if r["step"] > resumed_from]
    assert resumed_rows
    for r in resumed_rows:
        assert r["lr"] == pytest.approx(optim.lr * lr_factor(optim, r["step"], optim.steps), rel=1e-6), r
    assert (run.dir / "metrics.after-resume.jsonl").is_file()  # the killed run's later rows moved aside
    # Data: nothing trained before the checkpoint is trained again; continuing streams start at
    # their saved position; new streams exist when the run grew.
    before = {pos for step, pos in run.trained(segment - 1) if step <= resumed_from}
    after = run.trained(segment)
    assert after and all(step > resumed_from for step, _ in after)
    assert not before & {pos for _, pos in after}, "samples trained before the checkpoint were trained again"
    saved = run.streams(resumed_from)
    readers_now = set(range(world))  # one worker per rank (tiny.yaml)
    for sid in readers_now & saved.keys():
        mine = [(d, i) for _, (s, d, i) in after if s == sid]
        assert mine and min(mine) >= saved[sid], (sid, min(mine), saved[sid])
    assert {s for _, (s, _, _) in after} == readers_now
    if world < world_before:  # shrunk: the streams nobody reads now stay dormant in rank 0's state
        kept = json.loads((run.ckpt(last) / "rank-00000.json").read_text())["data"]["streams"]
        for sid in set(saved) - readers_now:
            assert (kept[str(sid)]["draw"], kept[str(sid)]["offset"]) == saved[sid]
    log = run.log.read_text()
    assert f"saved on {world_before} ranks, universal checkpoint" in log
    assert (run.ckpt(resumed_from) / "universal" / "zero").is_dir()


def test_elastic_resume_zero2_two_to_one_to_two_ranks(pretrain_inputs, tmp_path):
    run = Run(pretrain_inputs, tmp_path, stage=2)
    run.train(2, STEPS_PER_SEGMENT + 2)                    # steps 1-6, checkpoints 2, 4, 6
    run.train(1, 2 * STEPS_PER_SEGMENT + 2, resume=4)      # 2 -> 1 ranks from step 4 (6 is dropped)
    _check_resume(run, 1, 4)
    run.train(2, 3 * STEPS_PER_SEGMENT, resume=8)          # 1 -> 2 ranks: the dormant stream 1 continues
    _check_resume(run, 2, 8)
    assert metrics(run.dir)[-1]["samples_seen"] == (4 * 2 + 4 * 1 + 4 * 2) * MICRO


def test_elastic_resume_zero3_one_to_two_ranks(pretrain_inputs, tmp_path):
    run = Run(pretrain_inputs, tmp_path, stage=3)
    run.train(1, STEPS_PER_SEGMENT + 2)
    run.train(2, 2 * STEPS_PER_SEGMENT, resume=4)
    _check_resume(run, 1, 4)


def test_elastic_resume_zero1_two_to_one_ranks_and_refusal_leaves_the_run_untouched(pretrain_inputs, tmp_path):
    run = Run(pretrain_inputs, tmp_path, stage=1)
    run.train(2, STEPS_PER_SEGMENT + 2)
    # A resume that cannot work (another ZeRO stage) fails before writing anything.
    files = ["run_info.json", "config.yaml", "ds_config.json", "metrics.jsonl"]
    snapshot = {name: (run.dir / name).read_bytes() for name in files}
    listing = sorted(p.relative_to(run.dir).as_posix() for p in run.dir.rglob("*"))
    refused = tmp_path / "refused.txt"
    run_logged([sys.executable, str(PRETRAIN), "--config", str(TINY), *run.overrides, "dist.zero_stage=3",
                "--resume", "latest"], refused, expect=1)
    assert "saved with ZeRO stage 1, this run uses stage 3: resume with dist.zero_stage=1" in refused.read_text()
    assert {name: (run.dir / name).read_bytes() for name in files} == snapshot
    assert sorted(p.relative_to(run.dir).as_posix() for p in run.dir.rglob("*")) == listing

    run.train(1, 2 * STEPS_PER_SEGMENT, resume=4)
    _check_resume(run, 1, 4)
