"""``reolm embed items``: a trained Reo-LM's vectors of every item of a domain, plus a FAISS index."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from reolm.config import to_dict
from reolm.data.domain import read_domain
from reolm.io import atomic_dir
from reolm.serve.catalogue import MANIFEST, tensor_rows, write_revision
from reolm.serve.config import EmbedConfig
from reolm.serve.index import VectorIndex, normalise
from reolm.serve.model import ServingModel

__all__ = ["embed_items", "tables_identity"]

log = logging.getLogger(__name__)


def tables_identity(domain: Any, tokens: Any, images: Any, model: ServingModel) -> dict[str, Any]:
    """Which domain, token table (tokenizer key) and image features (vision model key) fed the model."""
    images_key = images.key or None
    info_path = domain.path / "image_features.json" if domain.path is not None else None
    if images_key is None and info_path is not None and info_path.is_file():
        try:
            images_key = json.loads(info_path.read_text()).get("key")
        except (OSError, ValueError):
            images_key = None
    return {"domain": domain.name, "domain_path": str(Path(domain.path).resolve()) if domain.path else None,
            "attributes": list(domain.attributes), "max_attr_tokens": int(model.config.max_attr_tokens),
            "tokens_key": tokens.key, "images_key": images_key if domain.image_features is not None else None,
            "image_feature_dim": model.image_dim, "items_with_image": int(np.asarray(images.has_image).sum())}


def embed_items(model_path: str | os.PathLike, domain_dir: str | os.PathLike, out: str | os.PathLike,
                cfg: EmbedConfig | None = None) -> dict[str, Any]:
    """Write the index folder ``out`` (``reolm.serve.catalogue``) for every item of the domain.

    Returns the manifest (with ``timings_s``). An existing index folder is replaced only once the
    new one is complete.
    """
    cfg = cfg or EmbedConfig()
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not an index folder (no {MANIFEST}); refusing to overwrite it")
    start = time.perf_counter()
    model = ServingModel(model_path, device=cfg.device, item_batch_size=cfg.batch_size, precision=cfg.precision)
    model.item.rec.progress = cfg.progress
    domain = read_domain(domain_dir)
    loaded = time.perf_counter()
    vectors = normalise(tensor_rows(model.catalogue_vectors(domain)))
    tokens, images = model.item.rec.tokens, model.item.rec.images
    encoded = time.perf_counter()
    index = VectorIndex.build(vectors, cfg.index)
    built = time.perf_counter()
    manifest = {"model": model.identity(), "tables": tables_identity(domain, tokens, images, model),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "embed": to_dict(cfg),
                "precision": model.precision,
                "timings_s": {"load": round(loaded - start, 3), "encode": round(encoded - loaded, 3),
                              "build_index": round(built - encoded, 3)}}
    with atomic_dir(out) as partial:
        manifest = write_revision(partial, 0, domain.item_ids(), np.ones(domain.num_items, bool), vectors,
                                  tokens, images, index, manifest)
    log.info("wrote %s: %d items, %s index", out, domain.num_items, cfg.index.kind)
    return manifest
