"""The scores and losses that pre-training, fine-tuning, evaluation and ``ReoLM`` share.

* **Scores** (:func:`similarity_scores`, :func:`paired_scores`): ``sim(query, key) /
  temperature`` with ``sim`` the dot product or the cosine similarity.  They are computed in fp32,
  or in fp64 when an input is fp64 (:func:`score_dtype`): never in half precision, whatever dtype
  the encoder ran in.  Ranking many blocks against the same vectors prepares them once
  (:func:`prepare_vectors`) and multiplies block by block (:func:`product_scores`).
* **InfoNCE** (:func:`info_nce`): cross-entropy of each query's cosine/temperature scores
  against a set of keys, the negatives being this process's keys (``gather=False``) or the
  keys of every rank, all-gathered with gradient (``gather=True``).
* **MLM** (:func:`masked_lm_loss`): token cross-entropy (fp32) normalised by the masked-token
  count of the contrastive group (this process's, or every rank's, counted by an all-reduce).
  :func:`mlm_predictions` reads a model's vocabulary logits and the labels at a batch's masked
  positions.

On one process (or with ``gather=False``) the losses are plain means over this process's rows;
the distributed normalisation is described in ``reolm/train/losses.py`` and docs/training.md.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from reolm import collectives
from reolm.data.batch import PackedBatch

__all__ = ["Similarity", "SIMILARITIES", "check_similarity", "score_dtype", "prepare_vectors", "product_scores",
           "similarity_scores", "paired_scores", "ContrastiveLoss", "info_nce", "MLMLoss", "masked_lm_loss",
           "mlm_predictions", "gathered_keys"]

Similarity = Literal["dot", "cosine"]
SIMILARITIES: tuple[str, ...] = ("dot", "cosine")


# ----------------------------------------------------------------------------- scores

def check_similarity(similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r} (expected 'dot' or 'cosine')")


def score_dtype(*vectors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is fp64: bf16/fp16 vectors are scored in fp32."""
    dtype = torch.float32
    for v in vectors:
        dtype = torch.promote_types(dtype, v.dtype)
    return dtype


def prepare_vectors(vectors: torch.Tensor, similarity: Similarity, dtype: torch.dtype | None = None
                    ) -> torch.Tensor:
    """The rows a score multiplies: cast to ``dtype`` (default :func:`score_dtype`), unit length for cosine."""
    check_similarity(similarity)
    vectors = vectors.to(dtype or score_dtype(vectors))
    return F.normalize(vectors, dim=-1) if similarity == "cosine" else vectors


def _scaled(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    # x / 1.0 == x exactly, so skipping the division only saves a pass over the scores.
    return scores / temperature if temperature != 1.0 else scores


def product_scores(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``queries @ keys.T / temperature`` [Q, K] of vectors from :func:`prepare_vectors`.

    ``out`` (a [Q, K] buffer, no autograd) receives the scores in place, so a blocked ranking
    reuses one buffer for every block."""
    if out is None:
        return _scaled(queries @ keys.T, temperature)
    torch.matmul(queries, keys.T, out=out)
    return out.div_(temperature) if temperature != 1.0 else out


def similarity_scores(queries: torch.Tensor, keys: torch.Tensor, similarity: Similarity = "cosine",
                      temperature: float = 1.0) -> torch.Tensor:
    """Score matrix [Q, K] of query vectors [Q, H] against key vectors [K, H]."""
    dtype = score_dtype(queries, keys)
    return product_scores(prepare_vectors(queries, similarity, dtype), prepare_vectors(keys, similarity, dtype),
                          temperature)


def paired_scores(queries: torch.Tensor, keys: torch.Tensor, similarity: Similarity = "cosine",
                  temperature: float = 1.0) -> torch.Tensor:
    """Row-wise scores [B] of queries [B, H] against their own keys [B, H]."""
    dtype = score_dtype(queries, keys)
    q, k = prepare_vectors(queries, similarity, dtype), prepare_vectors(keys, similarity, dtype)
    return _scaled((q * k).sum(-1), temperature)


# ----------------------------------------------------------------------------- InfoNCE

class ContrastiveLoss(NamedTuple):
    loss: torch.Tensor     #: mean cross-entropy over this process's queries
    correct: torch.Tensor  #: how many queries score their positive highest (int64 scalar)


def _group(gather: bool) -> tuple[int, int]:
    """(world size, rank) of the contrastive group: every process when gathering, else this one."""
    return (collectives.world_size(), collectives.rank()) if gather else (1, 0)


def gathered_keys(keys: torch.Tensor) -> torch.Tensor:
    """Every rank's ``keys`` concatenated, differentiably, in fp32 (or wider): the scores are fp32
    anyway, and the backward all-reduce then sums each key's gradients from all ranks in fp32
    rather than rounding every partial sum to bf16."""
    return collectives.all_gather_with_grad(keys.to(torch.promote_types(keys.dtype, torch.float32)))


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float, *, labels: torch.Tensor | None = None,
             gather: bool = False, key_ids: torch.Tensor | None = None) -> ContrastiveLoss:
    """InfoNCE of each query's cosine/temperature scores against every key of the contrastive group.

    ``labels`` [Q] are the rows of ``keys`` holding each query's positive (default: query i's
    positive is key i).  ``gather``: the negatives are the keys of every rank, all-gathered WITH
    gradient (``labels`` then point into this rank's block of them).  ``key_ids`` [K] (an item
    id per key row, gathered like the keys) masks out every other key that holds the positive's
    item, so a popular item is not its own negative.
    """
    world, rank = _group(gather)
    if world > 1:
        keys = gathered_keys(keys)
    local_keys = keys.shape[0] // world
    if labels is None:
        labels = torch.arange(queries.shape[0], device=queries.device)
    labels = labels + rank * local_keys if rank else labels
    logits = similarity_scores(queries, keys, "cosine", temperature)
    if key_ids is not None:
        all_ids = collectives.all_gather_no_grad(key_ids) if world > 1 else key_ids
        same = all_ids[labels][:, None] == all_ids[None, :]
        same[torch.arange(queries.shape[0], device=queries.device), labels] = False
        logits = logits.masked_fill(same, float("-inf"))
    # Mean over this rank's rows; DeepSpeed's mean over ranks then gives the group mean.
    loss = F.cross_entropy(logits, labels)
    return ContrastiveLoss(loss, (logits.argmax(dim=-1) == labels).sum())


# ----------------------------------------------------------------------------- MLM

class MLMLoss(NamedTuple):
    loss: torch.Tensor     #: this process's share of the group's mean token cross-entropy (fp32)
    tokens: torch.Tensor   #: masked tokens of this process (int64 scalar)
    correct: torch.Tensor  #: of which predicted right (int64 scalar)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, gather: bool = False,
                   ignore_index: int = -100) -> MLMLoss:
    """Token cross-entropy normalised by the contrastive group's masked-token count.

    ``logits`` [N, V] and ``labels`` [N] (``ignore_index`` where not masked).  Without
    ``gather`` (or on one process) ``loss`` is the mean over this process's masked tokens; with
    it, each rank's share is such that the mean over ranks is the group's mean.
    """
    labels = labels.reshape(-1)
    logits = logits.reshape(labels.shape[0], -1)
    summed = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    valid = labels != ignore_index
    local_count = valid.sum()
    world, _ = _group(gather)
    group_count = (collectives.all_reduce_sum(local_count.detach().clone().float()) if world > 1
                   else local_count.float())
    # share_r = CE_r / (count_group / world): the mean over ranks is CE_group / count_group.
    loss = summed * world / group_count.clamp(min=1.0)
    correct = ((logits.argmax(dim=-1) == labels) & valid).sum()
    return MLMLoss(loss, local_count, correct)


class _HasMLMHead(Protocol):
    def mlm_logits(self, mlm_hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...


def mlm_predictions(model: _HasMLMHead, output: Any, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocabulary logits [M, V], labels [M]) at the masked positions of ``batch`` (one packed
    batch, e.g. ``TrainingBatch.history``), read from ``output.mlm_hidden`` by ``model``'s LM head."""
    positions = batch.mlm_positions
    return model.mlm_logits(output.mlm_hidden, positions), batch.mlm_labels.index_select(0, positions)
