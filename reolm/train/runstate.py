"""Run-directory bookkeeping: which run owns a run directory, and how its last process ended.

``RUN_DIR/owner.json``  ``{"run_id", "config", "since"}``: the run that trains in this folder
                        (``ckpt.run_id``, e.g. ``slurm:CLUSTER:JOBID`` from the sbatch script) and
                        its resolved config without the keys that name the folder or the resume.
``RUN_DIR/status.json`` ``{"state", "step", "start_step", "reason", "time"}``: ``running`` while
                        training, then ``stopped`` (a stop signal: checkpointed, wants to go on)
                        or ``finished``.  The Slurm script reads it to decide whether to requeue.

:func:`claim_run_dir` runs on every rank before anything is written, so a refusal leaves the
folder as it was.  Rank 0 writes both files (atomically) once training starts.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from reolm.config import ConfigError, to_dict
from reolm.io import read_json, write_json

__all__ = ["RunDirError", "claim_run_dir", "mark_running", "write_status", "read_status", "OWNER_FILE",
           "STATUS_FILE"]

OWNER_FILE = "owner.json"
STATUS_FILE = "status.json"
# Keys that may differ between the processes of one run: where it lives and how it was resumed.
_VOLATILE_KEYS = ("run_dir", "ckpt.resume", "ckpt.run_id")


class RunDirError(ConfigError):
    """The run directory belongs to another run (or holds checkpoints a fresh start would mix)."""


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def identity_config(cfg: Any) -> dict[str, Any]:
    """The config as flat ``section.key`` values, without the keys that change between restarts."""
    return {k: v for k, v in _flat(to_dict(cfg)).items() if k not in _VOLATILE_KEYS}


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return read_json(path, RunDirError)
    except RunDirError as err:
        raise RunDirError(f"{err}; remove it or choose another run_dir") from None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, value)


def _describe_owner(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "a run that recorded no owner"
    return f"run '{owner.get('run_id') or '(no ckpt.run_id)'}' (since {owner.get('since', '?')})"


def _config_differences(theirs: dict[str, Any], ours: dict[str, Any], limit: int = 6) -> list[str]:
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    shown = [f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in keys[:limit]]
    return shown + ([f"... and {len(keys) - limit} more"] if len(keys) > limit else [])


def claim_run_dir(cfg: Any, checkpoints: list[Path]) -> Any:
    """Check that this run may use ``cfg.run_dir``; returns ``cfg`` with the resume to perform.

    ``checkpoints`` are the complete checkpoints already in the checkpoint folder.

    * ``ckpt.resume=''`` (a fresh start) is refused when checkpoints are there: training would
      interleave two runs' checkpoints and rotate the older ones away.
    * ``ckpt.resume=auto`` resumes only this run's own checkpoints: ``owner.json`` must name the
      same ``ckpt.run_id`` and the same config (differing keys are listed); no checkpoint at all
      means a fresh start.
    * ``ckpt.resume=latest`` or a path: the user asked for these checkpoints; no check.
    """
    resume = cfg.ckpt.resume
    if resume not in ("", "auto") or not checkpoints:
        return _with_resume(cfg, "" if resume == "auto" else resume)
    run_dir = Path(cfg.run_dir)
    owner = _read_json(run_dir / OWNER_FILE)
    newest = checkpoints[-1]
    ours = f"run '{cfg.ckpt.run_id or '(no ckpt.run_id)'}'"
    hint = ("Continue those checkpoints deliberately with --resume latest (ckpt.resume=latest), or give "
            "this run another run_dir.")
    if resume == "":
        raise RunDirError(f"{run_dir} already holds checkpoints (newest {newest.name}) of {_describe_owner(owner)}; "
                          f"this is a fresh start of {ours}: refusing to mix two runs. {hint}")
    if owner is None:
        raise RunDirError(f"{run_dir} holds checkpoints (newest {newest.name}) of {_describe_owner(owner)}; "
                          f"ckpt.resume=auto resumes only {ours}'s own checkpoints. {hint}")
    if owner.get("run_id", "") != cfg.ckpt.run_id:
        raise RunDirError(f"{run_dir} holds checkpoints (newest {newest.name}) of {_describe_owner(owner)}, "
                          f"not of this {ours}: refusing to resume another run. {hint}")
    diff = _config_differences(owner.get("config", {}), identity_config(cfg))
    if diff:
        raise RunDirError(f"{run_dir} holds checkpoints (newest {newest.name}) of {_describe_owner(owner)} with "
                          f"another config ({'; '.join(diff)}): refusing to resume them with this config. {hint}")
    return _with_resume(cfg, "latest")


def _with_resume(cfg: Any, resume: str) -> Any:
    if resume == cfg.ckpt.resume:
        return cfg
    return dataclasses.replace(cfg, ckpt=dataclasses.replace(cfg.ckpt, resume=resume))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def mark_running(cfg: Any, start_step: int) -> None:
    """Rank 0, when training starts: this run owns the folder, and it is running."""
    run_dir = Path(cfg.run_dir)
    owner = _read_json(run_dir / OWNER_FILE)
    if owner is None or owner.get("run_id") != cfg.ckpt.run_id or owner.get("config") != identity_config(cfg):
        _write_json(run_dir / OWNER_FILE, {"run_id": cfg.ckpt.run_id, "since": _now(),
                                           "config": identity_config(cfg)})
    write_status(run_dir, "running", start_step, start_step)


def write_status(run_dir: str | os.PathLike, state: str, step: int, start_step: int, reason: str = "") -> None:
    """``state`` is running, stopped (stop signal, checkpointed) or finished."""
    _write_json(Path(run_dir) / STATUS_FILE, {"state": state, "step": step, "start_step": start_step,
                                              "reason": reason, "time": _now()})


def read_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    return _read_json(Path(run_dir) / STATUS_FILE)


def main(argv: list[str] | None = None) -> int:
    """``python -m reolm.train.runstate RUN_DIR``: print ``STATE STEP START_STEP`` (for shell scripts)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m reolm.train.runstate RUN_DIR", file=sys.stderr)
        return 2
    try:
        status = read_status(args[0]) or {}
    except RunDirError as err:
        print(f"runstate: {err}", file=sys.stderr)
        return 1
    print(status.get("state", "none"), int(status.get("step", 0)), int(status.get("start_step", 0)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
