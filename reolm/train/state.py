"""What a pre-training run carries from step to step and from checkpoint to resume.

:class:`TrainerState` holds the run's counters and saves/loads itself through the
:class:`~reolm.train.checkpoint.CheckpointManager` (``trainer_state.json`` plus DeepSpeed's
client state); :class:`DataStreams` holds the reading positions of this rank's data workers
and, on rank 0, the dormant streams of a larger earlier layout, saved per rank
(``rank-R.json``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from reolm.config import to_dict
from reolm.data.corpus import vision_record
from reolm.train import distributed as D
from reolm.train.checkpoint import readers
from reolm.train.data import StreamPosition, StreamTracker, stream_id
from reolm.train.setup import TrainSetup

__all__ = ["TrainerState", "DataStreams"]

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

    def counters(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def resumed_from(cls, shared: Mapping[str, Any]) -> "TrainerState":
        """The state continuing a checkpoint's ``shared`` record: its counters, the next generation."""
        saved = {f.name: int(shared[f.name]) for f in dataclasses.fields(cls) if f.name in shared}
        return cls(**{**saved, "generation": saved.get("generation", 0) + 1})

    def checkpoint_record(self, setup: TrainSetup) -> dict[str, Any]:
        """``trainer_state.json``: the counters, the resolved config, the architecture (what export
        rebuilds), the layout (what a resume checks) and the vision model behind the image features."""
        module = setup.engine.module
        return {**self.counters(), "config": to_dict(setup.cfg), "backbone": module.backbone_config.to_dict(),
                "model": to_dict(module.config), "layout": setup.layout, **vision_record(setup.vision)}

    def save(self, setup: TrainSetup, streams: "DataStreams") -> Path:
        """Checkpoint the engine and this state at ``self.step`` (collective: every rank calls it)."""
        tokenizer = setup.engine.module.tokenizer
        return setup.ckpt.save(setup.engine, self.step, self.checkpoint_record(setup),
                               {"data": streams.checkpoint_record(setup)},
                               write_extra=lambda folder: _save_tokenizer(tokenizer, folder))

    @classmethod
    def resume(cls, setup: TrainSetup) -> tuple["TrainerState", dict[str, Any] | None]:
        """(state, the restored stream positions and bad counts or None) after loading ``setup.plan``."""
        if setup.plan is None:
            if setup.cfg.ckpt.resume and D.is_main():
                log.info("ckpt.resume=%s: no checkpoint in %s, starting fresh", setup.cfg.ckpt.resume,
                         setup.cfg.checkpoint_dir())
            return cls(), None
        shared, restored = setup.ckpt.load(setup.engine, setup.plan)
        state = cls.resumed_from(shared)
        if D.is_main():
            saved_world = shared.get("world_size")
            how = "" if saved_world == setup.info.world_size else f" (saved on {saved_world} ranks, universal checkpoint)"
            log.info("resumed from %s at step %d%s", setup.plan.path, state.step, how)
        return state, restored


def _save_tokenizer(tokenizer: Any, ckpt_path: Path) -> None:
    """Tokenizer files next to the weights, so `reolm export` needs nothing but the checkpoint."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(ckpt_path / "tokenizer"))


def _stream_ids(setup: TrainSetup) -> dict[int, int]:
    """worker -> global stream id of this rank's readers."""
    workers = max(setup.num_workers, 1)
    return {w: stream_id(setup.info.rank, w, workers, setup.cfg.data.replicate_stream) for w in range(workers)}


@dataclass
class DataStreams:
    """This rank's reading positions (``tracker``) and the ``dormant`` streams rank 0 keeps saving."""

    tracker: StreamTracker
    dormant: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def restore(cls, setup: TrainSetup, restored: dict[str, Any] | None) -> "DataStreams":
        """The streams this rank continues from, re-split by global stream id.

        A stream some reader of this layout owns continues at its saved position; ids beyond
        this layout's readers (the run shrank) stay dormant, their positions carried in rank 0's
        checkpoints until a larger layout reads them again; ids new to this layout (the run
        grew) start at their first draw, which nobody has read.
        """
        workers = max(setup.num_workers, 1)
        if not restored:
            return cls(StreamTracker(workers))
        saved = restored["streams"]
        mine = {w: StreamPosition(**saved[sid]) for w, sid in _stream_ids(setup).items() if sid in saved}
        dormant = {str(sid): pos for sid, pos in saved.items() if sid >= readers(setup.layout)}
        return cls(StreamTracker(workers, mine, restored["bad"]), dormant if setup.info.rank == 0 else {})

    def checkpoint_record(self, setup: TrainSetup) -> dict[str, Any]:
        """``rank-R.json``'s ``data``: positions by global stream id (dormant ones included), bad counts."""
        data = self.tracker.state(_stream_ids(setup))
        data["streams"].update(self.dormant)
        return data
