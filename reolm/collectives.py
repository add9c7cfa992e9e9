"""The collectives the shared objectives and training need; each is the identity on one process.

Kept below both :mod:`reolm.model.objectives` (gathered InfoNCE negatives, the MLM group count)
and :mod:`reolm.train.distributed` (process-group setup), so the model package never imports
from ``reolm.train``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["world_size", "rank", "all_gather_with_grad", "all_gather_no_grad", "all_reduce_sum"]


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed gradient.

    Every rank computes a loss over the SAME gathered tensor, and each rank's loss depends on
    every rank's rows, so the gradient of a row is the sum over ranks of d(loss_r)/d(row):
    backward all-reduces the incoming gradient and keeps the local slice.  (DeepSpeed then
    averages parameter gradients over ranks, see ``reolm/train/losses.py`` for the normalisation.)
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
