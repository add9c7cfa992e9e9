"""Process-group setup for every launcher, and the collectives training needs.

The same entry point runs under ``deepspeed`` (``--local_rank`` + env), ``torchrun`` (env),
Slurm's ``srun`` (``SLURM_*`` only) and plain ``python`` (one process).  :func:`setup_env`
maps whatever the launcher provided to the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``LOCAL_WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` variables that ``torch.distributed``'s
``env://`` rendezvous reads; :func:`init` then lets DeepSpeed create the process group with its
accelerator's backend (NCCL on GPUs, gloo on the CPU accelerator).
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, MutableMapping

import torch
import torch.distributed as dist

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
    if torch.cuda.is_available():
        torch.cuda.set_device(info_.local_rank)
    return info_


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


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed gradient.

    Every rank computes a loss over the SAME gathered tensor, and each rank's loss depends on
    every rank's rows, so the gradient of a row is the sum over ranks of d(loss_r)/d(row):
    backward all-reduces the incoming gradient and keeps the local slice.  (DeepSpeed then
    averages parameter gradients over ranks, see ``losses.py`` for the normalisation.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) over ranks along dim 0, differentiably."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (e.g. the checkpoint tag rank 0 picked)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
