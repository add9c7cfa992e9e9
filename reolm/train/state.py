"""What a pre-training run carries from step to step and from checkpoint to resume.

Every piece implements ``state_dict()`` / ``load_state_dict(state)`` and is registered once with
the :class:`~reolm.train.checkpoint.CheckpointManager` (:func:`register_run_state`):

* :class:`TrainerState`: the run's counters (shared: ``trainer_state.json``);
* :class:`RunRecord`: the resolved config, architecture, layout and vision model, which export
  and resume checks read (shared, written with the counters);
* the data streams (:class:`~reolm.train.data.StreamTracker`, per rank: ``rank-R.json`` ``data``);
* :class:`ProcessRNG`: Python, NumPy, torch and CUDA generators (per rank: ``rank-R.json`` ``rng``
  and the arrays in ``rank-R.npz``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from reolm.config import to_dict
from reolm.data.tables import vision_record
from reolm.train import distributed as D
from reolm.train.data import StreamTracker
from reolm.train.setup import TrainSetup

__all__ = ["TrainerState", "RunRecord", "ProcessRNG", "register_run_state", "resume"]

log = logging.getLogger("reolm.train")


@dataclass
class TrainerState:
    """The run's counters: optimizer steps, samples and tokens seen, skipped steps, resume generation.

    ``generation`` counts the starts of a run (0 fresh, +1 per resume); it re-seeds the shuffle
    buffers, which restart empty after a resume.
    """

    step: int = 0
    samples: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    generation: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a checkpoint's counters; loading starts the next generation (a resume is a new start)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, int(state.get(f.name, 0)))
        self.generation += 1


@dataclass(frozen=True)
class RunRecord:
    """What every checkpoint records about the run besides its counters: the resolved config, the
    architecture (what export rebuilds), the layout (what a resume checks) and the vision model
    behind the image features (what a resume and fine-tuning check)."""

    record: Mapping[str, Any]

    @classmethod
    def of(cls, setup: TrainSetup) -> "RunRecord":
        module = setup.engine.module
        return cls({"config": to_dict(setup.cfg), "backbone": module.backbone_config.to_dict(),
                    "model": to_dict(module.config), "layout": setup.checkpoints.layout,
                    **vision_record(setup.inputs.tables.vision)})

    def state_dict(self) -> dict[str, Any]:
        return dict(self.record)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore: the run describes itself from its config, and whatever a resume must
        agree on (layout, vision model) was checked by :func:`~reolm.train.setup.build_setup` first."""


class ProcessRNG:
    """This process' random generators as data: JSON-able scalars and plain arrays, never a pickle.

    On another layout rank r continues old rank r's generators; ranks the saving run did not
    have keep their fresh seeds.
    """

    def state_dict(self) -> dict[str, Any]:
        version, mt, gauss = random.getstate()
        _, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "python": {"version": version, "gauss": gauss},
            "numpy": {"pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python_mt": np.asarray(mt, dtype=np.int64), "numpy_keys": np.asarray(keys, dtype=np.uint32),
            "torch": torch.get_rng_state().numpy()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state().numpy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in state["python_mt"]), py["gauss"]))
        npm = state["numpy"]
        np.random.set_state(("MT19937", np.asarray(state["numpy_keys"], dtype=np.uint32), int(npm["pos"]),
                             int(npm["has_gauss"]), float(npm["cached_gaussian"])))
        torch.set_rng_state(torch.from_numpy(np.asarray(state["torch"], dtype=np.uint8).copy()))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.from_numpy(np.asarray(state["cuda"], dtype=np.uint8).copy()))

    def reshard(self, saved: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
        rank = D.info().rank
        return saved[rank] if rank < len(saved) else None


def _save_tokenizer(tokenizer: Any, ckpt_path: Path) -> None:
    """Tokenizer files next to the weights, so `reolm export` needs nothing but the checkpoint."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(ckpt_path / "tokenizer"))


def register_run_state(setup: TrainSetup, state: TrainerState, streams: StreamTracker) -> None:
    """Register what this run's checkpoints hold with its checkpoint manager (once per run)."""
    tokenizer = setup.inputs.tokenizer
    # The RNG first: rank-R.json keeps the key order that earlier versions wrote.
    setup.checkpoints.manager.register(shared={"trainer": state, "run": RunRecord.of(setup)},
                                       per_rank={"rng": ProcessRNG(), "data": streams},
                                       write_extra=lambda folder: _save_tokenizer(tokenizer, folder))


def resume(setup: TrainSetup) -> bool:
    """Load the planned checkpoint into the engine and the registered states; False on a fresh start."""
    cfg, checkpoints = setup.cfg, setup.checkpoints
    if checkpoints.plan is None:
        if cfg.ckpt.resume and D.is_main():
            log.info("ckpt.resume=%s: no checkpoint in %s, starting fresh", cfg.ckpt.resume, cfg.checkpoint_dir())
        return False
    shared = checkpoints.manager.load(setup.engine, checkpoints.plan)
    if D.is_main():
        saved_world = shared.get("world_size")
        how = "" if saved_world == setup.rank.info.world_size else f" (saved on {saved_world} ranks, universal checkpoint)"
        log.info("resumed from %s at step %d%s", checkpoints.plan.path, int(shared.get("step", 0)), how)
    return True
