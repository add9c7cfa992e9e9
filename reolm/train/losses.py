"""Pre-training losses: history->target InfoNCE over the global batch + 0.1 x MLM.

Normalisation (exact semantics, see docs/training.md "Loss semantics"):

* A **contrastive group** is the set of sequences whose targets serve as each other's
  negatives.  With ``negatives="global"`` it is one micro-batch on every rank (``micro_batch x
  world_size`` sequences; targets are all-gathered WITH gradient); with ``negatives="local"``
  it is this rank's micro-batch.
* Both loss parts are normalised over the group: InfoNCE is the mean over the group's
  histories, MLM is the summed token cross-entropy divided by the group's number of masked
  tokens (counted with an all-reduce, no host sync).  Each rank returns its share such that
  DeepSpeed's mean over ranks is exactly the group loss: for ``global`` a 2-rank step equals
  a 1-rank step on the concatenated batch, for the value and for the gradient.
* Gradient accumulation averages the group losses of the micro-steps (DeepSpeed scales each
  micro-step's loss by 1/accumulation).  Hence ``1 rank x 2 accumulation == 2 ranks x 1`` holds
  exactly when the groups match, i.e. with ``negatives="local"``; with ``global`` negatives
  the 2-rank run uses twice as many negatives per group, which is the paper's intent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from reolm.train.distributed import all_gather_no_grad, all_gather_with_grad, all_reduce_sum

__all__ = ["info_nce", "masked_lm_loss", "PretrainLoss", "LossParts", "retrieval_logits"]


def retrieval_logits(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cosine similarity / temperature between every query and every key ([Q, K])."""
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    return q @ k.t() / temperature


def _group_size(gather: bool) -> int:
    return dist.get_world_size() if gather and dist.is_initialized() else 1


def info_nce(history: torch.Tensor, target: torch.Tensor, temperature: float,
             gather: bool = True, target_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of each history against every target of the contrastive group.

    Returns (this rank's share of the group loss, number of correct top-1 predictions).
    ``target_ids`` (global item index per row), when given, masks out other rows that hold
    the SAME item as the positive, so a popular item is not its own negative.
    """
    world = _group_size(gather)
    rank = dist.get_rank() if world > 1 else 0
    keys = all_gather_with_grad(target) if world > 1 else target
    logits = retrieval_logits(history, keys, temperature)
    rows = history.shape[0]
    labels = torch.arange(rows, device=history.device) + rank * rows
    if target_ids is not None:
        all_ids = all_gather_no_grad(target_ids) if world > 1 else target_ids
        same = target_ids[:, None] == all_ids[None, :]
        same[torch.arange(rows, device=history.device), labels] = False
        logits = logits.masked_fill(same, float("-inf"))
    # Mean over this rank's rows; DeepSpeed's mean over ranks then gives the group mean.
    loss = F.cross_entropy(logits, labels)
    correct = (logits.argmax(dim=-1) == labels).sum()
    return loss, correct


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, gather: bool = True,
                   ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token cross-entropy normalised by the contrastive group's masked-token count.

    ``logits`` [N, V] and ``labels`` [N] (``ignore_index`` where not masked).  Returns
    (this rank's share, local masked count, local correct count).
    """
    labels = labels.reshape(-1)
    logits = logits.reshape(labels.shape[0], -1)
    summed = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    valid = labels != ignore_index
    local_count = valid.sum()
    world = _group_size(gather)
    group_count = all_reduce_sum(local_count.detach().clone().float()) if world > 1 else local_count.float()
    # share_r = CE_r / (count_group / world): the mean over ranks is CE_group / count_group.
    loss = summed * world / group_count.clamp(min=1.0)
    correct = ((logits.argmax(dim=-1) == labels) & valid).sum()
    return loss, local_count, correct


@dataclass
class LossParts:
    """Device tensors for one micro-step (no host sync until a logging step)."""

    total: torch.Tensor
    contrastive: torch.Tensor
    mlm: torch.Tensor
    contrastive_correct: torch.Tensor
    mlm_tokens: torch.Tensor
    mlm_correct: torch.Tensor


class PretrainLoss:
    """Combine the two parts: ``contrastive + mlm_weight * mlm``."""

    def __init__(self, temperature: float = 0.05, mlm_weight: float = 0.1, negatives: str = "global",
                 mask_duplicate_targets: bool = False) -> None:
        if negatives not in ("global", "local"):
            raise ValueError(f"negatives must be 'global' or 'local', got {negatives!r}")
        self.temperature = temperature
        self.mlm_weight = mlm_weight
        self.gather = negatives == "global"
        self.mask_duplicates = mask_duplicate_targets

    def __call__(self, history: torch.Tensor, target: torch.Tensor, mlm_logits: torch.Tensor | None,
                 mlm_labels: torch.Tensor | None, target_ids: torch.Tensor | None = None) -> LossParts:
        contrastive, correct = info_nce(history, target, self.temperature, self.gather,
                                        target_ids if self.mask_duplicates else None)
        if mlm_logits is not None and mlm_labels is not None and self.mlm_weight > 0:
            mlm, tokens, mlm_correct = masked_lm_loss(mlm_logits, mlm_labels, self.gather)
        else:
            mlm = contrastive.new_zeros(())
            tokens = mlm_correct = torch.zeros((), dtype=torch.long, device=contrastive.device)
        total = contrastive + self.mlm_weight * mlm
        return LossParts(total, contrastive.detach(), mlm.detach(), correct, tokens, mlm_correct)
