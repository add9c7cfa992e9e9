"""Checkpoints: DeepSpeed engine state + our trainer state; atomic, complete, data-only, elastic.

Layout of ``CKPT_DIR`` (a filesystem every rank sees)::

    step-00000500/            one complete checkpoint (DeepSpeed files + ours)
        mp_rank_00_model_states.pt, *optim_states.pt ...   engine.save_checkpoint(...)
        rank-00000.json       per-rank: data-stream positions (by global stream id), bad-sample
                              counts, the non-array parts of the RNG states
        rank-00000.npz        per-rank RNG state arrays (python, numpy, torch, cuda)
        tokenizer/            the tokenizer files (export needs nothing else)
        trainer_state.json    step, samples/tokens seen, resolved config, architecture, layout
        manifest.json         written LAST: every file with its size, sha256 of our own files,
                              world size, step, ZeRO stage
        universal/            (only after an elastic resume) DeepSpeed's universal checkpoint
    step-00000500.tmp/        a save in progress (never read; removed by the next save)
    latest                    the tag of the newest saved checkpoint (written by rename)

A save writes everything under ``<tag>.tmp``, waits for every rank, then rank 0 writes the
manifest, renames the folder to ``<tag>``, points ``latest`` at it and deletes all but the
newest ``keep_last``.  Resume verifies the manifest (every file present with its size, our
own files' sha256, one rank file per rank of the saving world): the newest checkpoint that
verifies is used and every newer one that does not is reported by name.

What goes into a checkpoint besides the engine is registered once (:meth:`CheckpointManager.register`):
objects with ``state_dict()`` / ``load_state_dict(state)`` (:class:`Stateful`, torchtitan's
idea).  *Shared* states (the trainer's counters, the run's description) are merged into
``trainer_state.json`` and DeepSpeed's client state, written by rank 0; *per-rank* states (the
data streams, the RNG) go to ``rank-R.json`` under their names, the RNG's arrays to
``rank-R.npz`` (:func:`~reolm.train.checkpoint_files.write_rank_states`).

Nothing here unpickles: our files are JSON and ``.npz`` (``allow_pickle=False``); DeepSpeed's
``.pt`` files are checked and loaded weights-only (:mod:`reolm.train.safe_load`).

Elastic resume: a checkpoint saved on N ranks loads on M ranks through DeepSpeed's universal
checkpoint (``ds_to_universal``, converted once by rank 0 into ``<tag>/universal``, then
``checkpoint.load_universal``); each per-rank state rebuilds its own part from every saved
rank's (:meth:`RankStateful.reshard`: the data streams are re-split by global stream id).
:func:`~reolm.train.checkpoint_files.plan_resume` decides before anything is written.

The files themselves (rank files, the manifest, choosing and planning a resume) are
:mod:`reolm.train.checkpoint_files`; this module is the collective save and load.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from reolm.io import atomic_dir, write_json, write_text
from reolm.train import distributed as D
from reolm.train.checkpoint_files import (MANIFEST, STATE_FILE, UNIVERSAL, CheckpointError, ResumePlan,
                                          checkpoint_folders, plan_resume, read_json_file, read_rank_states,
                                          resolve_resume, step_tag, write_manifest, write_rank_states)
from reolm.train.safe_load import check_folder, weights_only_loads

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

__all__ = ["CheckpointManager", "Stateful", "RankStateful"]

log = logging.getLogger("reolm.train.checkpoint")


# ----------------------------------------------------------------------------- manager

class Stateful(Protocol):
    """Something a checkpoint saves and a resume restores: JSON-able state in, the same state out."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class RankStateful(Stateful, Protocol):
    """Per-rank state, which also knows how to continue on another layout (ranks x workers)."""

    def reshard(self, saved: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
        """This rank's state from every rank's of the saving run (in rank order); None = keep the fresh one."""


class CheckpointManager:
    """Save and restore the engine and the registered states; rank 0 owns renames, rotation and ``latest``."""

    def __init__(self, ckpt_dir: str | os.PathLike, keep_last: int = 3) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.shared: dict[str, Stateful] = {}
        self.per_rank: dict[str, RankStateful] = {}
        self.write_extra: Callable[[Path], None] | None = None

    def register(self, *, shared: Mapping[str, Stateful], per_rank: Mapping[str, RankStateful],
                 write_extra: Callable[[Path], None] | None = None) -> None:
        """What every checkpoint of this run holds besides the engine (once, before the first load or save).

        ``write_extra(folder)`` runs on rank 0 inside the temporary folder before the manifest
        (e.g. tokenizer files), so it is part of the atomic, verified checkpoint.
        """
        if self.shared or self.per_rank:
            raise RuntimeError("CheckpointManager.register: the states are already registered")
        self.shared, self.per_rank, self.write_extra = dict(shared), dict(per_rank), write_extra

    def _shared_record(self) -> dict[str, Any]:
        """The shared states merged into one record (``trainer_state.json`` is flat)."""
        record: dict[str, Any] = {}
        for name, stateful in self.shared.items():
            state = stateful.state_dict()
            clash = sorted(set(record) & set(state))
            if clash:
                raise CheckpointError(f"shared state {name!r} repeats the keys {clash} of another shared state")
            record.update(state)
        return record

    # ------------------------------------------------------------------ save
    def save(self, engine: "DeepSpeedEngine", step: int) -> Path:
        """Collective: every rank calls it; each rank writes its own registered per-rank states."""
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)
        info = D.info()
        tag = step_tag(step)
        tmp_tag = tag + ".tmp"
        final = self.dir / tag
        if info.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("*.tmp"):  # an earlier save that died half-way
                shutil.rmtree(stale, ignore_errors=True)
        D.barrier()
        shared = self._shared_record()
        # The universal-checkpoint marker lets ds_to_universal convert this checkpoint later.
        client = {"trainer": shared,
                  UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state=client, save_latest=False)
        tmp = self.dir / tmp_tag
        tmp.mkdir(parents=True, exist_ok=True)
        write_rank_states(tmp, info.rank, info.world_size,
                          {name: stateful.state_dict() for name, stateful in self.per_rank.items()})
        D.barrier()
        if info.rank == 0:
            if self.write_extra is not None:
                self.write_extra(tmp)
            write_json(tmp / STATE_FILE, {**shared, "world_size": info.world_size})
            write_manifest(tmp, step, info.world_size, int(shared.get("layout", {}).get("zero_stage", 0)))
            if final.exists():  # re-saving the same step (e.g. the end of a resumed run)
                shutil.rmtree(final)
            # The save's own rename (DeepSpeed wrote into the .tmp tag): the manifest inside is last.
            os.replace(tmp, final)
            write_text(self.dir / "latest", tag)
            self.rotate()
        D.barrier()
        return final

    def rotate(self) -> list[Path]:
        """Delete all but the newest ``keep_last`` checkpoints; returns what was removed."""
        done = [p for p in checkpoint_folders(self.dir) if (p / MANIFEST).is_file()]
        removed = done[:-self.keep_last] if len(done) > self.keep_last else []
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    # ------------------------------------------------------------------ load
    def plan(self, resume: str, layout: Mapping[str, Any]) -> ResumePlan | None:
        """Rank 0 picks and checks the checkpoint, every rank gets its plan or its error."""
        choice: Any = None
        if D.info().rank == 0:
            try:
                found = resolve_resume(resume, self.dir)
                choice = plan_resume(found, layout) if found else None
            except CheckpointError as err:
                choice = err.args[0]
        choice = D.broadcast_object(choice)
        if isinstance(choice, str):
            raise CheckpointError(choice)
        return choice

    def universal_folder(self, path: Path) -> Path:
        """``path/universal``: DeepSpeed's universal checkpoint of ``path``, converted once by rank 0."""
        out = path / UNIVERSAL
        if D.info().rank == 0 and not out.is_dir():
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
            from types import SimpleNamespace
            log.info("converting %s to a universal checkpoint (the number of ranks changed)", path)
            with atomic_dir(out) as tmp, weights_only_loads():
                # One extraction process: the conversion runs inside a rank that holds a process group.
                ds_to_universal(SimpleNamespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                                                num_merge_workers=1, keep_temp_folder=False, strict=True,
                                                inject_missing_state=True))
        D.barrier()
        return out

    def load(self, engine: "DeepSpeedEngine", plan: ResumePlan) -> dict[str, Any]:
        """Load the engine and every registered state; returns the shared record (``world_size`` included)."""
        path = plan.path
        check_folder(path)  # every .pt: only tensors, containers and allow-listed DeepSpeed classes
        load_dir, tag = (path, UNIVERSAL) if plan.universal else (path.parent, path.name)
        if plan.universal:
            self.universal_folder(path)
        with weights_only_loads():
            load_path, client = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
        shared = read_json_file(path / STATE_FILE)
        shared.update((client or {}).get("trainer", {}))
        for stateful in self.shared.values():
            stateful.load_state_dict(shared)
        self._restore_rank(path, int(shared["world_size"]), plan.same_layout)
        return shared

    def _restore_rank(self, path: Path, saved_world: int, same_layout: bool) -> None:
        """This rank's registered per-rank states.

        Same layout: each from this rank's own file.  Otherwise each state rebuilds its part from
        every saved rank's (:meth:`RankStateful.reshard`); one the saving run did not write keeps
        its fresh state.
        """
        rank = D.info().rank
        if same_layout:
            own = read_rank_states(path, rank)
            for name, stateful in self.per_rank.items():
                if name in own:
                    stateful.load_state_dict(own[name])
            return
        saved = [read_rank_states(path, r) for r in range(saved_world)]
        for name, stateful in self.per_rank.items():
            state = stateful.reshard([ranks.get(name, {}) for ranks in saved])
            if state is not None:
                stateful.load_state_dict(state)
