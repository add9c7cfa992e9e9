"""Process-group setup for every launcher (the collectives live in :mod:`reolm.collectives`).

The same entry point runs under ``deepspeed`` (``--local_rank`` + env), ``torchrun`` (env),
Slurm's ``srun`` (``SLURM_*`` only) and plain ``python`` (one process).  :func:`setup_env`
maps whatever the launcher provided to the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``LOCAL_WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` variables that ``torch.distributed``'s
``env://`` rendezvous reads; :func:`init` then lets DeepSpeed create the process group with its
accelerator's backend (NCCL on GPUs, gloo on the CPU accelerator).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Mapping, MutableMapping

import torch
import torch.distributed as dist

from reolm.collectives import all_gather_no_grad, all_gather_with_grad, all_reduce_sum
from reolm.train import stopsignal
from reolm.train.stopsignal import STOP_SIGNALS

__all__ = [
    "DistInfo",
    "setup_env",
    "slurm_env",
    "init",
    "info",
    "is_main",
    "barrier",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "broadcast_object",
    "StopFlag",
    "STOP_SIGNALS",
    "LauncherWatch",
    "launcher_ancestors",
    "ignore_stop_signals_in_worker",
    "all_reduce_sum",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)

    @property
    def num_nodes(self) -> int:
        return max(self.world_size // max(self.local_world_size, 1), 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list (``node[01-04]`` -> ``node01``) via ``scontrol``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    # Without scontrol (tests, containers): expand the simplest forms ourselves.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split(",")[0].split("-")[0].rstrip("]")
        return prefix + first
    return head


def slurm_env(env: Mapping[str, str]) -> dict[str, str]:
    """Rank variables derived from ``SLURM_*`` for one task per GPU (or per CPU rank).

    Used when the job step was started by ``srun`` directly (no torchrun/deepspeed launcher):
    ``SLURM_PROCID`` is the global rank, ``SLURM_LOCALID`` the local rank, ``SLURM_NTASKS`` the
    world size; the rendezvous host is the first node of ``SLURM_JOB_NODELIST`` unless
    ``MASTER_ADDR`` is already set (the sbatch script exports it).
    """
    out: dict[str, str] = {}
    out["RANK"] = env["SLURM_PROCID"]
    out["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
    out["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if not tasks_per_node:
        nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
        tasks_per_node = str(max(int(out["WORLD_SIZE"]) // max(nodes, 1), 1))
    out["LOCAL_WORLD_SIZE"] = tasks_per_node
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or first_slurm_host(
        env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
    # A port derived from the job id lets two jobs share a node without colliding.
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def setup_env(env: MutableMapping[str, str] | None = None, local_rank_arg: int | None = None) -> DistInfo:
    """Fill the ``env://`` rendezvous variables from whichever launcher started us."""
    env = os.environ if env is None else env
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.update(slurm_env(env))
    if local_rank_arg is not None and local_rank_arg >= 0 and "LOCAL_RANK" not in env:
        env["LOCAL_RANK"] = str(local_rank_arg)
    if "RANK" not in env:  # plain `python launch/pretrain.py`: a world of one
        env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    if "LOCAL_WORLD_SIZE" not in env:
        # The deepspeed launcher exports LOCAL_SIZE (ranks on this node) and CROSS_SIZE (nodes).
        env["LOCAL_WORLD_SIZE"] = env.get("LOCAL_SIZE") or str(_local_world_size_guess(env))
    return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]),
                    int(env["LOCAL_WORLD_SIZE"]))


def _local_world_size_guess(env: Mapping[str, str]) -> int:
    """World size / number of nodes when the node count is known (CROSS_SIZE), else one node."""
    cross = env.get("CROSS_SIZE")
    world = int(env.get("WORLD_SIZE", "1"))
    if cross and int(cross) > 0:
        return max(world // int(cross), 1)
    return world


def init(timeout_minutes: float = 30.0) -> DistInfo:
    """Create the process group through DeepSpeed (its accelerator picks NCCL or gloo)."""
    import datetime

    import deepspeed

    info_ = setup_env()
    if not dist.is_initialized():
        deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
        unlink_shm_allreduce_buffer(info_)
    if torch.cuda.is_available():
        torch.cuda.set_device(info_.local_rank)
    return info_


def shm_allreduce_buffer(rank: int, env: Mapping[str, str] | None = None) -> Path:
    """The /dev/shm file DeepSpeed's CPU shared-memory allreduce creates for ``rank`` (its naming)."""
    env = os.environ if env is None else env
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
                               f"{env.get('MASTER_PORT', '')}_{rank}")


def unlink_shm_allreduce_buffer(info_: DistInfo) -> None:
    """Remove this rank's DeepSpeed shared-memory allreduce file once every rank has mapped it.

    On CPU, DeepSpeed's ``init_distributed`` creates a 66 MiB file per rank in /dev/shm, maps its
    peers' files and never deletes them, so every run (and every test) left them behind until
    the machine's memory filled up (/dev/shm is RAM). Each rank opens all peer files inside
    ``init_distributed``; after the barrier every mapping exists, and unlinking the names frees
    the memory when the processes exit, however they exit (SIGKILL included).
    """
    barrier()  # on every rank alike, whether or not DeepSpeed made the file (no rank may skip it)
    shm_allreduce_buffer(info_.rank).unlink(missing_ok=True)
    if info_.local_rank == 0:
        remove_orphaned_shm_buffers()


def remove_orphaned_shm_buffers(max_age_s: float = 600.0, shm_dir: Path = Path("/dev/shm")) -> list[Path]:
    """Delete this user's DeepSpeed allreduce files that no process maps any more; returns them.

    A run killed inside ``init_distributed`` (before :func:`unlink_shm_allreduce_buffer`), or one
    that ran before that function existed, leaves its 66 MiB files behind for good. A file
    nobody maps is garbage whoever made it; the age limit keeps the moment between DeepSpeed
    creating a file and mapping it out of reach.
    """
    now = time.time()
    candidates = []
    for path in shm_dir.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if now - path.stat().st_mtime > max_age_s:
                candidates.append(path)
        except FileNotFoundError:
            continue
    if not candidates:
        return []
    mapped = _mapped_shm_files(shm_dir)
    removed = [p for p in candidates if str(p) not in mapped]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _mapped_shm_files(shm_dir: Path) -> set[str]:
    """Paths under ``shm_dir`` that some process on this machine maps (from /proc/*/maps)."""
    prefix = str(shm_dir).rstrip("/") + "/"
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process exited, or is another user's
            continue
        for line in text.splitlines():
            fields = line.split(maxsplit=5)  # address perms offset device inode [path]
            if len(fields) == 6 and fields[5].startswith(prefix):
                mapped.add(fields[5])
    return mapped


def info() -> DistInfo:
    if not dist.is_available() or not dist.is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))


def is_main() -> bool:
    return info().rank == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# Command-line fragments of the launchers that start ranks (parent processes we watch).
_LAUNCHER_MARKERS = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                     "/bin/deepspeed", "/bin/torchrun")


def ignore_stop_signals_in_worker(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: stop signals are the training process's business.

    A SIGTERM to the whole process group (torchrun's and deepspeed's shutdown, ``kill -TERM
    -PGID``, Slurm's step signals) would otherwise kill the workers first, and the rank would die
    with "DataLoader worker is killed by signal" before it could checkpoint.  torch installs its
    own worker handlers before calling ``worker_init_fn``, so ignoring the signals here wins.
    An ignoring worker must still never outlive its rank: on Linux the kernel kills it when its
    parent dies (``PR_SET_PDEATHSIG``); elsewhere torch's parent watchdog ends it within seconds.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


def launcher_ancestors(pid: int | None = None) -> list[tuple[int, float, str]]:
    """(pid, start time, name) of the launcher processes above this rank, nearest first.

    Under ``deepspeed`` that is the per-node ``deepspeed.launcher.launch`` and the ``deepspeed``
    runner above it; under torchrun the agent; under srun or plain python nothing.
    """
    import psutil

    found = []
    try:
        for proc in psutil.Process(pid).parents():
            cmdline = " ".join(proc.cmdline())
            if not any(marker in cmdline for marker in _LAUNCHER_MARKERS):
                break
            found.append((proc.pid, proc.create_time(), proc.name()))
    except psutil.Error:
        pass
    return found


class LauncherWatch:
    """Notices that a launcher above this rank has exited (checked at most once per ``period`` s).

    SIGTERM to the ``deepspeed`` runner alone kills it without telling the per-node launcher,
    and a killed torchrun agent leaves its ranks running in their own sessions: either way the
    ranks would train on, orphaned.  A rank that sees its launcher gone stops as if signalled.
    """

    def __init__(self, period: float = 1.0) -> None:
        self.launchers = launcher_ancestors()
        self.period = period
        self._next = 0.0

    def gone(self) -> str | None:
        """The name and pid of the first launcher that has exited, or None."""
        import psutil

        now = time.monotonic()
        if not self.launchers or now < self._next:
            return None
        self._next = now + self.period
        for pid, started, name in self.launchers:
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                pass
            return f"{name} (pid {pid})"
        return None


class StopFlag:
    """A stop request (signal or vanished launcher) that all ranks agree on at step boundaries.

    Stop signals are caught by :mod:`reolm.train.stopsignal` from the rank's first lines, so one
    received during setup is remembered instead of killing the rank.  The handler only records it;
    :meth:`agreed` all-reduces it (MAX) over a gloo group on CPU tensors, so the per-step check
    costs no accelerator synchronisation, and every rank stops after the same step even if the
    signal reaches the ranks at different times.  Every rank must call :meth:`agreed` at the same
    points (the gloo group for a non-gloo backend is created by the first call, collectively).
    """

    def __init__(self, watch_launcher: bool = True) -> None:
        self.reason: str | None = None
        self._group: Any = None
        self._group_ready = False
        self._watch = LauncherWatch() if watch_launcher else None
        stopsignal.catch_stop_signals()  # (reolm/commands/pretrain.py already did, before its imports)

    @property
    def raised(self) -> bool:
        return self.reason is not None

    def _poll(self) -> None:
        if self.reason is None:
            self.reason = stopsignal.received()
        if self.reason is None and self._watch is not None:
            gone = self._watch.gone()
            if gone:
                self.reason = f"launcher {gone} exited"

    def agreed(self) -> bool:
        self._poll()
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.raised
        if not self._group_ready:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
            self._group_ready = True
        flag = torch.tensor([1 if self.raised else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        stop = bool(flag.item())  # a CPU tensor: no device synchronisation
        if stop and self.reason is None:
            self.reason = "another rank was asked to stop"
        return stop


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (e.g. the checkpoint tag rank 0 picked)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
