"""Checkpoints: DeepSpeed engine state + our trainer state, atomic, rotated, resumable.

Layout of ``CKPT_DIR`` (a filesystem every rank sees)::

    step-00000500/            one complete checkpoint (DeepSpeed files + ours)
        mp_rank_00_model_states.pt, *optim_states.pt ...   engine.save_checkpoint(...)
        trainer_state.json    step, samples seen, tokens seen, resolved config, world size
        rank-00000.pt         per-rank: RNG states (python, numpy, torch, cuda), data stream state
    step-00000500.tmp/        a save in progress (never read; removed by the next save)
    latest                    the tag of the newest complete checkpoint (written by rename)

A save writes everything under ``<tag>.tmp``, waits for every rank, then rank 0 renames the
folder to ``<tag>``, points ``latest`` at it and deletes all but the newest ``keep_last``.  A
crash at any point leaves either the previous checkpoints or the new complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from reolm.train import distributed as D

__all__ = ["CheckpointManager", "rng_state", "set_rng_state", "step_tag", "complete_checkpoints",
           "resolve_resume"]

TAG_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first (a folder is complete once renamed from .tmp)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(TAG_RE.match(p.name).group(1)))


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder ``resume`` names ('' -> None, 'latest' -> newest or None, or a path)."""
    if not resume:
        return None
    if resume == "latest":
        done = complete_checkpoints(ckpt_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"ckpt.resume={resume}: not a complete checkpoint (no {STATE_FILE})")
    return path


class CheckpointManager:
    """Save and restore engine + trainer state; rank 0 owns renames, rotation and ``latest``."""

    def __init__(self, ckpt_dir: str | os.PathLike, keep_last: int = 3) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last

    # ------------------------------------------------------------------ save
    def save(self, engine: Any, step: int, shared: dict[str, Any], per_rank: dict[str, Any],
             write_extra: Callable[[Path], None] | None = None) -> Path:
        """Collective: every rank calls it with its own ``per_rank`` state.

        ``write_extra(folder)`` runs on rank 0 inside the temporary folder before the rename
        (e.g. tokenizer files), so it is part of the atomic checkpoint.
        """
        info = D.info()
        tag = step_tag(step)
        tmp_tag = tag + ".tmp"
        final = self.dir / tag
        if info.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("*.tmp"):  # an earlier save that died half-way
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # re-saving the same step (e.g. end of a resumed run)
                shutil.rmtree(final)
        D.barrier()
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state={"trainer": shared},
                               save_latest=False)
        tmp = self.dir / tmp_tag
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save({"rank": info.rank, "world_size": info.world_size, "rng": rng_state(), **per_rank},
                   tmp / f"rank-{info.rank:05d}.pt")
        D.barrier()
        if info.rank == 0:
            if write_extra is not None:
                write_extra(tmp)
            # trainer_state.json marks a complete checkpoint: written last, then the folder renamed.
            (tmp / STATE_FILE).write_text(json.dumps({**shared, "world_size": info.world_size}, indent=2))
            os.replace(tmp, final)
            latest_tmp = self.dir / "latest.tmp"
            latest_tmp.write_text(tag)
            os.replace(latest_tmp, self.dir / "latest")
            self.rotate()
        D.barrier()
        return final

    def rotate(self) -> list[Path]:
        """Delete all but the newest ``keep_last`` complete checkpoints; returns what was removed."""
        done = complete_checkpoints(self.dir)
        removed = done[:-self.keep_last] if len(done) > self.keep_last else []
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    # ------------------------------------------------------------------ load
    def find(self, resume: str) -> Path | None:
        """Rank 0 resolves ``resume`` and broadcasts it, so every rank loads the same tag."""
        choice = None
        if D.info().rank == 0:
            found = resolve_resume(resume, self.dir)
            choice = str(found) if found else None
        choice = D.broadcast_object(choice)
        return Path(choice) if choice else None

    def load(self, engine: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Load engine state; returns (shared trainer state, this rank's state or None)."""
        load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed could not load the checkpoint {path}")
        shared = json.loads((path / STATE_FILE).read_text())
        shared.update((client or {}).get("trainer", {}))
        rank_file = path / f"rank-{D.info().rank:05d}.pt"
        per_rank = None
        if rank_file.is_file() and shared.get("world_size") == D.info().world_size:
            per_rank = torch.load(rank_file, map_location="cpu", weights_only=False)
            set_rng_state(per_rank["rng"])
        return shared, per_rank
