"""Pre-training losses: history->target InfoNCE over the global batch + 0.1 x MLM.

The two parts are :func:`reolm.model.objectives.info_nce` and
:func:`~reolm.model.objectives.masked_lm_loss` (shared with fine-tuning); this module combines them.

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

from reolm.model.objectives import info_nce, masked_lm_loss

__all__ = ["PretrainLoss", "LossParts"]


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
        contrastive, correct = info_nce(history, target, self.temperature, gather=self.gather,
                                        key_ids=target_ids if self.mask_duplicates else None)
        if mlm_logits is not None and mlm_labels is not None and self.mlm_weight > 0:
            mlm, tokens, mlm_correct = masked_lm_loss(mlm_logits, mlm_labels, gather=self.gather)
        else:
            mlm = contrastive.new_zeros(())
            tokens = mlm_correct = torch.zeros((), dtype=torch.long, device=contrastive.device)
        total = contrastive + self.mlm_weight * mlm
        return LossParts(total, contrastive.detach(), mlm.detach(), correct, tokens, mlm_correct)
