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

Nothing here unpickles: our files are JSON and ``.npz`` (``allow_pickle=False``); DeepSpeed's
``.pt`` files are checked and loaded weights-only (:mod:`reolm.train.safe_load`).

Elastic resume: a checkpoint saved on N ranks loads on M ranks through DeepSpeed's universal
checkpoint (``ds_to_universal``, converted once by rank 0 into ``<tag>/universal``, then
``checkpoint.load_universal``); the data streams are re-split by global stream id
(:func:`merge_stream_states`).  :func:`plan_resume` decides before anything is written.

The files themselves (RNG as data, the manifest, choosing and planning a resume) are
:mod:`reolm.train.checkpoint_files`; this module is the collective save and load.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from reolm.io import atomic_dir, write_json, write_text
from reolm.train import distributed as D
from reolm.train.checkpoint_files import (MANIFEST, STATE_FILE, TAG_RE, UNIVERSAL, CheckpointError, ResumePlan,
                                          checkpoint_folders, complete_checkpoints, merge_stream_states,
                                          newest_complete, plan_resume, rank_file_names, read_json_file,
                                          read_rank_state, readers, resolve_resume, rng_state, run_layout,
                                          set_rng_state, step_tag, verify_checkpoint, write_manifest)
from reolm.train.safe_load import check_folder, weights_only_loads

# The manager, and the names of checkpoint_files that callers reach through this module.
__all__ = ["CheckpointManager", "CheckpointError", "ResumePlan", "rng_state", "set_rng_state", "step_tag",
           "complete_checkpoints", "checkpoint_folders", "verify_checkpoint", "resolve_resume", "plan_resume",
           "newest_complete", "read_json_file", "read_rank_state", "merge_stream_states", "run_layout", "readers",
           "write_manifest", "STATE_FILE", "MANIFEST", "TAG_RE"]

log = logging.getLogger("reolm.train.checkpoint")


# ----------------------------------------------------------------------------- manager

class CheckpointManager:
    """Save and restore engine + trainer state; rank 0 owns renames, rotation and ``latest``."""

    def __init__(self, ckpt_dir: str | os.PathLike, keep_last: int = 3) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last

    # ------------------------------------------------------------------ save
    def save(self, engine: Any, step: int, shared: dict[str, Any], per_rank: dict[str, Any],
             write_extra: Callable[[Path], None] | None = None) -> Path:
        """Collective: every rank calls it with its own JSON-able ``per_rank`` state.

        ``write_extra(folder)`` runs on rank 0 inside the temporary folder before the manifest
        (e.g. tokenizer files), so it is part of the atomic, verified checkpoint.
        """
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
        # The universal-checkpoint marker lets ds_to_universal convert this checkpoint later.
        client = {"trainer": shared,
                  UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state=client, save_latest=False)
        tmp = self.dir / tmp_tag
        tmp.mkdir(parents=True, exist_ok=True)
        meta, arrays = rng_state()
        json_name, npz_name = rank_file_names(info.rank)
        np.savez(tmp / npz_name, **arrays)
        write_json(tmp / json_name, {"rank": info.rank, "world_size": info.world_size, "rng": meta, **per_rank},
                   indent=None)
        D.barrier()
        if info.rank == 0:
            if write_extra is not None:
                write_extra(tmp)
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

    def load(self, engine: Any, plan: ResumePlan) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load engine state; returns (shared trainer state, this rank's restored per-rank state)."""
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
        return shared, self._restore_rank(path, int(shared["world_size"]), plan.same_layout)

    @staticmethod
    def _restore_rank(path: Path, saved_world: int, same_layout: bool) -> dict[str, Any]:
        """This rank's RNG states and the data-stream positions it continues from.

        Same layout: its own file.  Otherwise every saved rank's streams are merged (global
        stream ids), rank r < saved world restores old rank r's RNG (the others keep their
        fresh seeds), and only rank 0 carries the old bad-sample totals (they are summed).
        """
        rank = D.info().rank
        if same_layout:
            meta, arrays = read_rank_state(path, rank)
            set_rng_state(meta["rng"], arrays)
            positions, bad = merge_stream_states([meta.get("data", {})])
            return {"streams": positions, "bad": bad}
        states = [read_rank_state(path, r) for r in range(saved_world)]
        if rank < saved_world:
            set_rng_state(states[rank][0]["rng"], states[rank][1])
        positions, bad = merge_stream_states([meta.get("data", {}) for meta, _ in states])
        return {"streams": positions, "bad": bad if rank == 0 else {}}
