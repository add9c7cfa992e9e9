"""Text-derived initial item rows for an ID model (``sasrec.item_init``, ``--item-init``).

The item vectors of the domain come from a content model, loaded the way evaluation loads it
(:func:`reolm.saved.resolve`):
a Reo-LM fine-tuning run (the vectors it scores with: its frozen item table, plus its ID rows when
transductive), a pre-trained
export (zero-shot) or a plain HF checkpoint (zero-shot PLM).  They are mapped to the ID model's
width by :func:`project_rows`:

1. every vector is L2-normalised: Reo-LM scores by cosine, so a vector's norm carries nothing
   the content model uses, while an ID model's dot product would read it as popularity;
2. centred, then projected on its top ``width`` principal components (eigenvectors of the
   ``D x D`` covariance in float64: deterministic, and memory stays ``D x D`` however many items
   there are), ordered by variance; each component's sign is fixed so that its largest entry is
   positive (an eigenvector's sign is arbitrary); when ``D`` or the number of items is below
   ``width`` the remaining columns are 0;
3. scaled by one factor so that the entries' standard deviation is the ID model's init std
   (0.02, :data:`reolm.baselines.base.ITEM_INIT_STD`): the table then starts at the scale the
   model's other weights and learning rate were tuned for, while the components keep their
   relative variances (per-component whitening would inflate the noise directions).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from reolm.data.domain import Domain
from reolm.finetune.config import FinetuneConfig

__all__ = ["content_item_vectors", "project_rows", "text_item_rows"]

log = logging.getLogger(__name__)


def content_item_vectors(source: str | Path, domain: Domain, cfg: FinetuneConfig) -> torch.Tensor:
    """[num_items, D] float32 item vectors of ``domain`` from the content model at ``source``
    (a Reo-LM run or export, or a plain HF checkpoint), on the CPU."""
    from reolm.precision import resolve_device
    from reolm.saved import resolve

    saved = resolve(source)
    saved.check_domain(domain, f"item_init {source}")
    if not saved.kind.content:
        raise ValueError(f"item_init {source}: a {saved.name!r} model has no item content to start from; "
                         f"give a Reo-LM run or export, or a plain HF checkpoint")
    model = saved.load(cfg, domain)
    model.progress = cfg.train.progress
    model.to(resolve_device(cfg.train.device)).set_precision(cfg.train.precision).eval()
    model.bind(domain)
    vectors = model.item_vectors()  # a run's frozen table, else every item encoded
    log.info("item_init: %d item vectors of width %d from %s (%s)", *vectors.shape, saved.folder, saved.name)
    return vectors.detach().float().cpu()


def project_rows(vectors: torch.Tensor, width: int, std: float) -> torch.Tensor:
    """[N, width] float32 rows from [N, D] ``vectors`` (module docstring: normalise, centre, top
    principal components with fixed signs, one scale to ``std``)."""
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ValueError(f"item_init needs [num_items >= 2, D] vectors, got shape {tuple(vectors.shape)}")
    x = torch.nn.functional.normalize(vectors.double(), dim=1)
    x = x - x.mean(0, keepdim=True)
    eigenvalues, eigenvectors = torch.linalg.eigh(x.T @ x)      # ascending
    k = min(width, x.shape[1], x.shape[0] - 1)                   # centring removes one dimension
    components = eigenvectors[:, eigenvalues.argsort(descending=True)[:k]]
    projected = x @ components                                   # [N, k]
    signs = projected.gather(0, projected.abs().argmax(0, keepdim=True)).sign()
    projected = projected * signs.masked_fill(signs == 0, 1.0)
    rows = torch.zeros(x.shape[0], width, dtype=torch.float64)
    rows[:, :k] = projected
    spread = rows.pow(2).mean().sqrt()                           # centred: the entries' std
    if not torch.isfinite(spread) or spread <= 0:
        raise ValueError("item_init: the item vectors are all identical; nothing to initialise from")
    return (rows * (std / spread)).float()


def text_item_rows(source: str | Path, domain: Domain, cfg: FinetuneConfig, width: int,
                   std: float) -> torch.Tensor:
    """[num_items, width] initial item rows of ``domain`` from the content model at ``source``."""
    return project_rows(content_item_vectors(source, domain, cfg), width, std)
