"""The files of a checkpoint folder, and choosing the checkpoint to resume: no engine involved.

Per-rank state is JSON + ``.npz`` (:func:`write_rank_states`: the arrays of the ``rng`` state,
never pickled); ``manifest.json`` lists
every file with its size (and sha256 of ours) and is written last, so a folder verifies only when
its save completed.  :func:`plan_resume` decides whether and how a checkpoint can be resumed with
this run's layout before anything is written.  The layout of a checkpoint folder and the save
protocol are described in :mod:`reolm.train.checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from reolm.io import read_json, write_json

__all__ = ["CheckpointError", "ResumePlan", "step_tag", "rank_file_names", "read_json_file", "read_rank_state",
           "write_rank_states", "read_rank_states", "write_manifest", "verify_checkpoint", "checkpoint_folders",
           "complete_checkpoints", "newest_complete", "resolve_resume", "run_layout", "readers", "plan_resume",
           "TAG_RE", "STATE_FILE", "MANIFEST", "UNIVERSAL", "ARRAY_STATE"]

log = logging.getLogger("reolm.train.checkpoint")

TAG_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
UNIVERSAL = "universal"
MANIFEST_VERSION = 1
# The per-rank state whose arrays rank-R.npz holds (the RNG's, saved before states were named):
# the .npz keys are the array names alone, so only one state may store arrays.
ARRAY_STATE = "rng"
# The keys of rank-R.json that say who wrote it; every other key is one registered state.
_RANK_FILE_KEYS = ("rank", "world_size")


class CheckpointError(ValueError):
    """A checkpoint is incomplete, refused, or cannot be resumed with this configuration."""


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def rank_file_names(rank: int) -> tuple[str, str]:
    return f"rank-{rank:05d}.json", f"rank-{rank:05d}.npz"


# ----------------------------------------------------------------------------- per-rank files

def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object file of a checkpoint; unreadable or malformed is a CheckpointError naming it."""
    return read_json(path, CheckpointError)


def read_rank_state(folder: Path, rank: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON part, RNG arrays) of one rank's saved state; a malformed file is a CheckpointError."""
    json_name, npz_name = rank_file_names(rank)
    try:
        meta = json.loads((folder / json_name).read_text())
        with np.load(folder / npz_name, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: rank {rank} state unreadable ({type(err).__name__}: {err})") from None
    return meta, arrays


def write_rank_states(folder: Path, rank: int, world_size: int, states: Mapping[str, Mapping[str, Any]]) -> None:
    """``rank-R.json`` (every state's JSON part under its name) and ``rank-R.npz`` (the arrays of
    :data:`ARRAY_STATE`); an array in any other state is refused, the file format has no place for it."""
    json_name, npz_name = rank_file_names(rank)
    record: dict[str, Any] = {"rank": rank, "world_size": world_size}
    arrays: dict[str, np.ndarray] = {}
    for name, state in states.items():
        found = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
        if found and name != ARRAY_STATE:
            raise CheckpointError(f"per-rank state {name!r} holds arrays ({', '.join(found)}); only "
                                  f"{ARRAY_STATE!r} may (rank-R.npz)")
        arrays.update(found)
        record[name] = {k: v for k, v in state.items() if k not in found}
    np.savez(folder / npz_name, **arrays)
    write_json(folder / json_name, record, indent=None)


def read_rank_states(folder: Path, rank: int) -> dict[str, dict[str, Any]]:
    """One rank's saved states by name (:data:`ARRAY_STATE` with its arrays back); the inverse of
    :func:`write_rank_states`, and reads the files any earlier reolm wrote."""
    meta, arrays = read_rank_state(folder, rank)
    states = {name: dict(value) for name, value in meta.items()
              if name not in _RANK_FILE_KEYS and isinstance(value, Mapping)}
    if ARRAY_STATE in states:
        states[ARRAY_STATE].update(arrays)
    return states


# ----------------------------------------------------------------------------- manifest

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_ours(relpath: str) -> bool:
    # DeepSpeed's own files are large .pt pickles (checked weights-only at load); ours are small.
    return not relpath.endswith(".pt")


def write_manifest(folder: Path, step: int, world_size: int, zero_stage: int) -> dict[str, Any]:
    """List every file of ``folder`` (sizes; sha256 of ours) in ``manifest.json``, written last."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith((MANIFEST, UNIVERSAL + "/")):  # itself, and the conversion made at resume
            continue
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if _is_ours(rel):
            entry["sha256"] = _sha256(path)
        files[rel] = entry
    manifest = {"format_version": MANIFEST_VERSION, "step": step, "world_size": world_size,
                "zero_stage": zero_stage, "files": files}
    write_json(folder / MANIFEST, manifest, indent=1)
    return manifest


def verify_checkpoint(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when its manifest verifies."""
    path = folder / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST} (the save did not finish, or an older reolm wrote it)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        world = int(manifest["world_size"])
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is malformed ({type(err).__name__}: {err})"
    if manifest.get("format_version", 0) > MANIFEST_VERSION:
        return f"{MANIFEST} format_version {manifest['format_version']} is newer than this reolm"
    required = [STATE_FILE] + [name for rank in range(world) for name in rank_file_names(rank)]
    for name in required:
        if name not in files:
            return f"{name} is not listed in its {MANIFEST}"
    for rel, entry in files.items():
        file = folder / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != entry.get("size"):
            return f"{rel} has {file.stat().st_size} bytes, the manifest says {entry.get('size')}"
        if "sha256" in entry and _sha256(file) != entry["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def checkpoint_folders(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Every ``step-XXXXXXXX`` folder (complete or not, never a .tmp), oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(found, key=lambda p: int(TAG_RE.match(p.name).group(1)))


def complete_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders whose manifest verifies, oldest first."""
    return [p for p in checkpoint_folders(ckpt_dir) if verify_checkpoint(p) is None]


def newest_complete(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported by name.

    No checkpoint folder at all -> None (a fresh start); folders but none complete -> an error
    (silently starting over would throw away a run).
    """
    folders = checkpoint_folders(ckpt_dir)
    problems = []
    for folder in reversed(folders):
        reason = verify_checkpoint(folder)
        if reason is None:
            for bad, why in problems:
                log.warning("checkpoint %s is incomplete (%s); resuming from %s instead", bad, why, folder.name)
            return folder
        problems.append((folder, reason))
    if problems:
        listing = "; ".join(f"{p.name}: {why}" for p, why in problems)
        raise CheckpointError(f"{ckpt_dir}: no complete checkpoint to resume from ({listing}). Pass "
                              f"ckpt.resume=PATH of a complete one, or remove them to start afresh.")
    return None


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder ``resume`` names ('' -> None, 'latest' -> newest complete or None, or a path)."""
    if not resume:
        return None
    if resume == "latest":
        return newest_complete(ckpt_dir)
    path = Path(resume)
    reason = verify_checkpoint(path) if path.is_dir() else "not a directory"
    if reason:
        raise CheckpointError(f"ckpt.resume={resume}: not a complete checkpoint ({reason})")
    return path


# ----------------------------------------------------------------------------- resume plan

@dataclass(frozen=True)
class ResumePlan:
    """What resuming ``path`` takes: ``universal`` when the ZeRO partitioning changes with the world."""

    path: Path
    universal: bool
    same_layout: bool  # same ranks and readers: every rank restores exactly its own state


def run_layout(world_size: int, zero_stage: int, offload: bool, num_workers: int, replicate: bool,
               resample: bool) -> dict[str, Any]:
    """The facts of a run's layout that decide whether (and how) a checkpoint can be resumed."""
    return {"world_size": world_size, "zero_stage": zero_stage, "offload": offload,
            "num_workers": max(num_workers, 1), "replicate": replicate, "resample": resample}


def readers(layout: Mapping[str, Any]) -> int:
    return int(layout["num_workers"]) * (1 if layout["replicate"] else int(layout["world_size"]))


def plan_resume(path: Path, now: Mapping[str, Any]) -> ResumePlan:
    """How to resume ``path`` with the layout ``now``; a CheckpointError when it cannot work.

    Called on rank 0 before anything in the run directory is written.
    """
    try:
        saved = json.loads((path / STATE_FILE).read_text())["layout"]
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path / STATE_FILE}: no run layout recorded ({err})") from None
    where = f"checkpoint {path}"
    if saved["zero_stage"] != now["zero_stage"]:
        raise CheckpointError(f"{where} was saved with ZeRO stage {saved['zero_stage']}, this run uses stage "
                              f"{now['zero_stage']}: resume with dist.zero_stage={saved['zero_stage']} (changing "
                              f"the stage of a run is not supported)")
    world_changed = saved["world_size"] != now["world_size"]
    if world_changed and (saved.get("offload") or now["offload"]):
        raise CheckpointError(f"{where}: resuming on {now['world_size']} ranks instead of {saved['world_size']} "
                              f"is not supported with ZeRO optimizer offload (DeepSpeedCPUAdam); resume on "
                              f"{saved['world_size']} ranks or without offload")
    if not now["resample"] and (not saved.get("resample", True) or world_changed) and readers(saved) != readers(now):
        raise CheckpointError(
            f"{where}: data.resample=false splits the shards among the {readers(saved)} readers (ranks x "
            f"workers) of the saved run, this run has {readers(now)}; re-splitting mid-pass would re-read "
            f"shards. Resume with {saved['world_size']} ranks x {saved['num_workers']} workers, or use "
            f"data.resample=true")
    universal = world_changed and int(saved["zero_stage"]) > 0
    same = not world_changed and readers(saved) == readers(now) and saved["num_workers"] == now["num_workers"]
    return ResumePlan(path, universal, same)
