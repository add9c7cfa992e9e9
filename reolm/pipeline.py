"""Multi-stage pipelines of ordinary user commands: the demo, the real-data transfer benchmark, the paper recipe.

A :class:`Stage` is one command line (run as a subprocess with an argument list, never through a
shell), the files it reads and the path whose existence marks it done.  :func:`run_stages` runs
the stages in order and skips finished ones, so an interrupted pipeline resumes where it stopped;
it records each stage's wall time and peak memory (the largest process of the stage's process
tree). A finished stage is **stale** when its configuration changed since it ran (its
``fingerprint``) or when an earlier stage remade one of its inputs after it ran: the pipeline
then stops and names what to move aside, instead of mixing results of two settings (a summary
stage with ``refresh`` is simply run again).  :func:`print_plan` is the ``--dry-run``: every
command with its inputs, and for each input whether it exists already or which earlier stage
makes it, so a wiring mistake in a pipeline shows before hours of compute are spent.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TextIO

from reolm.io import read_json, write_text

__all__ = ["Stage", "fingerprint", "stale_reason", "reolm_command", "console_script", "deepspeed_launcher",
           "python_command", "run_stages", "plan_lines", "print_plan", "display_command", "missing_inputs"]

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stage:
    """One step: a command, what it reads, and the path (may hold ``*``) whose existence marks it done."""

    name: str
    argv: list[str]
    done_marker: Path
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[], None] | None = None
    inputs: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)  # besides done_marker: what later stages may read
    note: str = ""  # one line shown by the dry run (e.g. an estimate of the stage's cost)
    before: Callable[[], None] | None = None  # run before the command; raises SystemExit to refuse it
    # A cheap summary (a report, a table): done only while its marker is newer than every input
    # file, so a model added to a finished run (a new row) or re-run shows up on the next
    # invocation. Modification times only: an input removed, one copied in with older times
    # (cp -p) or a folder input goes unnoticed; delete the marker to force it.
    refresh: bool = False
    # What decides the result besides the input paths, e.g. a hash of the config sections the
    # command reads (:func:`fingerprint`); "" = not tracked. A finished stage whose recorded
    # fingerprint differs is stale.
    fingerprint: str = ""

    def made_paths(self) -> list[Path]:
        return [self.done_marker, *self.outputs]

    def is_done(self) -> bool:
        markers = glob.glob(str(self.done_marker))
        if not markers or not self.refresh:
            return bool(markers)
        made = min(os.path.getmtime(m) for m in markers)
        return all(os.path.getmtime(p) <= made for p in self.inputs if p.is_file())


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (a model name, overrides, config sections)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def reolm_command(*args: str) -> list[str]:
    """``reolm ARGS`` with this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "reolm", *args]


def python_command(script: str | Path, *args: str) -> list[str]:
    """``python SCRIPT ARGS`` with this interpreter; a relative script is taken from the repository."""
    path = Path(script)
    return [sys.executable, str(path if path.is_absolute() else REPO_ROOT / path), *args]


def console_script(name: str) -> str:
    """A console script of this environment (``torchrun``), found next to this interpreter, else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def deepspeed_launcher(nproc: int) -> list[str]:
    """The real DeepSpeed launcher next to this interpreter (the venv's bin/), ``nproc`` local ranks."""
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        found = shutil.which("deepspeed")
        if found is None:
            raise FileNotFoundError("the `deepspeed` launcher is not installed in this environment")
        launcher = Path(found)
    # A port per process, so pipelines started side by side do not meet at one rendezvous.
    return [str(launcher), "--num_gpus", str(nproc), "--master_port", str(29500 + os.getpid() % 1000)]


def _short(arg: str) -> str:
    """Repository paths shown relative to the repository (what a user types from its root)."""
    if arg.startswith(str(REPO_ROOT) + os.sep):
        return os.path.relpath(arg, REPO_ROOT)
    for prefix in ("=", ":"):  # key=value overrides and KEY=path env assignments
        head, sep, tail = arg.partition(prefix)
        if sep and tail.startswith(str(REPO_ROOT) + os.sep):
            return head + sep + os.path.relpath(tail, REPO_ROOT)
    return arg


def display_command(stage: Stage) -> str:
    """The stage's command as a user would type it (``reolm ...``, ``python launch/...``)."""
    argv = list(stage.argv)
    if argv[:3] == [sys.executable, "-m", "reolm"]:
        argv = ["reolm", *argv[3:]]
    elif argv and argv[0] == sys.executable:
        argv = ["python", *argv[1:]]
    elif argv and Path(argv[0]).parent == Path(sys.executable).parent:
        argv = [Path(argv[0]).name, *argv[1:]]  # a console script of this environment (deepspeed, torchrun)
    env = [f"{k}={_short(v)}" for k, v in stage.env.items()]
    return shlex.join([*env, *(_short(a) for a in argv)])


def _produces(earlier: Path, wanted: Path) -> bool:
    """Does a stage that makes ``earlier`` provide ``wanted`` (same path, or one inside the other)?"""
    a, b = str(earlier), str(wanted)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def _exists(path: Path) -> bool:
    return bool(glob.glob(str(path)))


def _input_status(path: Path, stages: Sequence[Stage], index: int) -> str:
    for j in range(index - 1, -1, -1):
        if any(_produces(made, path) for made in stages[j].made_paths()):
            return f"from [{j + 1}] {stages[j].name}"
    return "present" if _exists(path) else "MISSING"


def missing_inputs(stages: Sequence[Stage]) -> dict[Path, str]:
    """Inputs that neither exist nor come from an earlier stage -> the first stage that reads each."""
    missing: dict[Path, str] = {}
    for i, stage in enumerate(stages):
        for path in stage.inputs:
            if path not in missing and _input_status(path, stages, i) == "MISSING":
                missing[path] = stage.name
    return missing


STATE_FILE = "stages.json"  # RUN_DIR/stages.json: {stage: {"finished": unix time, "fingerprint": str}}


def _read_state(run_dir: Path | None) -> dict[str, dict]:
    path = None if run_dir is None else run_dir / STATE_FILE
    if path is None or not path.exists():
        return {}
    hint = "; move it aside to run again (finished stages are then taken as they are)"
    try:
        state = read_json(path, error=SystemExit)
    except SystemExit as exc:
        raise SystemExit(f"{exc}{hint}") from None
    if not all(isinstance(v, dict) for v in state.values()):
        raise SystemExit(f"{path}: expected {{stage name: {{finished, fingerprint}}}}{hint}")
    return state


def stale_reason(stages: Sequence[Stage], index: int, state: dict[str, dict]) -> str:
    """Why the finished stage ``stages[index]`` no longer matches the pipeline ("" = it does).

    Only stages this module ran and recorded in ``state`` are checked: one finished before the
    record was kept, or by hand, is taken as it is."""
    stage = stages[index]
    ran = state.get(stage.name)
    if ran is None:
        return ""
    if stage.fingerprint and ran.get("fingerprint") and ran["fingerprint"] != stage.fingerprint:
        return "its configuration changed since it ran"
    for path in stage.inputs:
        for j in range(index - 1, -1, -1):
            if any(_produces(made, path) for made in stages[j].made_paths()):
                upstream = state.get(stages[j].name)
                if upstream and upstream.get("finished", 0) > ran.get("finished", 0):
                    return f"its input {_short(str(path))} was remade by [{j + 1}] {stages[j].name} after it ran"
                break
    return ""


def plan_lines(stages: Sequence[Stage], run_dir: Path | None = None) -> list[str]:
    """The dry run's text: numbered stages, each with its inputs (and where they come from) and
    command; with ``run_dir``, finished stages that are stale say why."""
    lines: list[str] = []
    total = len(stages)
    record = _read_state(run_dir)
    for i, stage in enumerate(stages):
        state = "done" if stage.is_done() else "to do"
        reason = stale_reason(stages, i, record) if state == "done" else ""
        if reason:
            state = f"done but STALE: {reason}"
        lines.append(f"[{i + 1}/{total}] {stage.name} ({state})")
        for path in stage.inputs:
            lines.append(f"    input  {_short(str(path))}  ({_input_status(path, stages, i)})")
        for path in stage.outputs:
            lines.append(f"    output {_short(str(path))}")
        refreshed = " and is newer than its input files" if stage.refresh else ""
        lines.append(f"    done when {_short(str(stage.done_marker))} exists{refreshed}")
        if stage.note:
            lines.append(f"    note   {stage.note}")
        lines.append(f"    $ {display_command(stage)}")
    return lines


def print_plan(stages: Sequence[Stage], out: TextIO | None = None, run_dir: Path | None = None) -> int:
    """Print the plan; returns the number of inputs that are missing (neither present nor made earlier)."""
    out = out or sys.stdout
    for line in plan_lines(stages, run_dir):
        print(line, file=out)
    missing = missing_inputs(stages)
    if missing:
        print(f"\n{len(missing)} input(s) are made by no stage and missing here (provide them before running):",
              file=out)
        for path, name in missing.items():
            print(f"    {_short(str(path))}  (first read by: {name})", file=out)
    return len(missing)


def _run_one(stage: Stage) -> tuple[int, float, float]:
    """Run the stage's command; returns (exit code, peak RSS in GiB of the largest process of its
    tree, CPU seconds (user + system) of the whole tree)."""
    proc = subprocess.Popen(stage.argv, env={**os.environ, **stage.env}, cwd=REPO_ROOT)
    # wait4 reports the child's usage including its waited-for descendants (the DeepSpeed
    # launcher's ranks): ru_maxrss is then the largest process of the tree, in KiB on Linux. It is
    # never below this process's own RSS (the child is forked before it execs): keep the runner small.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    scale = 2**30 if sys.platform == "darwin" else 2**20
    # CPU seconds do not grow when other work shares the cores, unlike the wall time: on a busy
    # host they say what the stage costs.
    return proc.returncode, usage.ru_maxrss / scale, usage.ru_utime + usage.ru_stime


def run_stages(run_dir: Path, stages: Sequence[Stage], resume_hint: str) -> dict[str, dict[str, float]]:
    """Run the stages not done yet; returns {stage: {"wall_s", "cpu_s", "peak_rss_gib"}} (also in
    RUN_DIR/timings.json).

    A failing stage stops the pipeline with ``resume_hint`` (how to continue after fixing it); so
    does a finished stage that is stale (:func:`stale_reason`), naming the output to move aside.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    timings_path = run_dir / "timings.json"
    timings: dict[str, dict[str, float]] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    total = len(stages)
    for i, stage in enumerate(stages, start=1):
        if stage.is_done():
            reason = stale_reason(stages, i - 1, _read_state(run_dir))
            if not reason:
                print(f"[{i}/{total}] {stage.name}: already done, skipping", flush=True)
                continue
            if not stage.refresh:
                raise SystemExit(
                    f"stage {stage.name!r} finished but is stale: {reason}. Its result would mix two settings: "
                    f"move its output aside (the folder or file of {_short(str(stage.done_marker))}) and run the "
                    "same command again to redo it and what depends on it")
            print(f"[{i}/{total}] {stage.name}: stale ({reason}), running again", flush=True)
        print(f"[{i}/{total}] {stage.name}: {display_command(stage)}", flush=True)
        if stage.before is not None:
            stage.before()
        start = time.perf_counter()
        code, peak_gib, cpu_s = _run_one(stage)
        if code != 0:
            raise SystemExit(f"stage {stage.name!r} failed with exit code {code}; {resume_hint}")
        if stage.check is not None:
            stage.check()
        # Re-read first: another runner on the same run directory (a second lane) may have added its stages.
        if timings_path.exists():
            timings = {**json.loads(timings_path.read_text()), **timings}
        timings[stage.name] = {"wall_s": round(time.perf_counter() - start, 2), "cpu_s": round(cpu_s, 1),
                               "peak_rss_gib": round(peak_gib, 3)}
        write_text(timings_path, json.dumps(timings, indent=2))
        _record_finished(run_dir, stage)
    return timings


def _record_finished(run_dir: Path, stage: Stage) -> None:
    """Note when the stage finished and with which fingerprint (re-read first, like the timings:
    a second lane may share the run directory)."""
    state = _read_state(run_dir)
    state[stage.name] = {"finished": time.time(), "fingerprint": stage.fingerprint}
    write_text(run_dir / STATE_FILE, json.dumps(state, indent=2))
