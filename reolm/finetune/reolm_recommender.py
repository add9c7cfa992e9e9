"""Reo-LM as a :class:`~reolm.eval.evaluate.Recommender`, its item tables, and its saved folder.

The recommender wraps a :class:`~reolm.model.ReoLM` and the tokenizer of its folder (the model
holds none: the recommender is what collates items, so it holds the tokenizer, as an HF pipeline
holds model and tokenizer side by side) and reads item content (token table, image features) from
the domain it is bound to (:meth:`ReoLMRecommender.bind`):

* ``item_vectors()`` — every item of the domain encoded as ``[CLS] item`` (chunked, no
  gradient), or the **frozen item table** once stage 2 of fine-tuning has set one; plus, for the
  transductive variant (``reolm.item_id_embedding``), each item's learned **ID row**
  (:meth:`ReoLMRecommender.with_item_ids`; zero for items never seen in training);
* ``user_vectors(histories)`` — the history encoded as ``[CLS]`` + items most recent first,
  without masking;
* scores are cosine similarity / temperature, as in training.

A saved Reo-LM (``RUN_DIR/best/``) is an HF-style export (``ReoLM.save_pretrained``:
config.json + model.safetensors + tokenizer files, so ``ReoLM.from_pretrained`` loads it
as a starting point for anything else) plus::

    item_vectors.safetensors   the frozen item table of stage 2 ([num_items, H] float32)
    item_id_embedding.safetensors   the ID rows of the transductive variant ([num_items, H] float32)
    config.yaml                the run's resolved FinetuneConfig
    recommender.json           descriptor (written last: its presence marks a complete folder)

A bare export (no ``recommender.json``) loads as ``reolm-zeroshot``: no fine-tuning, the top
adapters averaged (``top_routing: mean``).  A plain HF checkpoint loads as
``plm-zeroshot`` (:func:`load_plm`): a fresh Reo-LM on it, which computes the PLM's text
encoding (zero adapters, zero item positions) plus each item's image token, whose untrained
embedding is drawn from a fixed seed so every run, and ``reolm export backbone``, has the same one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from reolm.config import from_dict, save_resolved, to_dict
from reolm.data import corpus
from reolm.data.batch import PackedBatch
from reolm.data.collate import PackedCollator, SequenceExample
from reolm.data.tables import VisionIdentity, check_same_vision, recorded_vision, vision_record
from reolm.data.domain import Domain
from reolm.data.tables import ImageFeatureTable, ItemTokenTable, load_tokenizer
from reolm.finetune.reolm_config import ReoLMSection
from reolm.io import atomic_dir, read_json, write_json
from reolm.model import ModelConfig, ReoLM
from reolm import precision as numerics
from reolm.runtime import FreedMemoryBound
from reolm.saved.folder import (BACKBONE_ORIGIN, DESCRIPTOR, check_item_rows, descriptor, is_reolm_export,
                                load_item_rows, read_descriptor, save_item_rows)

__all__ = ["ReoLMRecommender", "domain_token_table", "domain_image_table", "trained_vision",
           "save_reolm_folder", "load_reolm", "load_plm", "fresh_plm", "sized_for_domain", "ITEM_VECTORS",
           "ITEM_ID_EMBEDDING", "ID_SUFFIX"]

log = logging.getLogger(__name__)
ITEM_VECTORS = "item_vectors.safetensors"
ITEM_ID_EMBEDDING = "item_id_embedding.safetensors"
ID_SUFFIX = "-id"  # model names of the transductive variant: reolm-id, reolm-nopretrain-id
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float64: "fp64", torch.float16: "fp16"}
PLM_SEED = 0  # draws the untrained image-token parameters of a zero-shot PLM


# ----------------------------------------------------------------------------- item tables

def domain_token_table(domain: Domain, tokenizer: Any, cfg: ModelConfig, progress: bool = True) -> ItemTokenTable:
    """The domain's token table for ``tokenizer`` and the model's attribute cap (built when missing)."""
    return corpus.domain_token_table(domain, tokenizer, cfg.max_attr_tokens, progress)


def domain_image_table(domain: Domain, cfg: ModelConfig) -> ImageFeatureTable:
    """The domain's image features at the model's width, or every item on the void image."""
    return corpus.domain_image_table(domain, cfg.image_feature_dim)


def trained_vision(folder: str | os.PathLike | None) -> VisionIdentity | None:
    """The vision model whose features the image MLP of the export ``folder`` was trained on.

    None when there is nothing to check: no export (a fresh backbone), or an export of a plain
    checkpoint (`reolm export backbone`: its image MLP never saw features).
    """
    path = Path(folder) / "config.json" if folder else None
    if path is None or not path.is_file():
        return None
    config = read_json(path)
    if config.get("origin") == BACKBONE_ORIGIN:
        return None
    return recorded_vision(config, str(path))


def sized_for_domain(model_cfg: ModelConfig, domain: Domain | None) -> ModelConfig:
    """``model_cfg`` with a fresh image MLP sized to the domain's image features, instead of failing
    on a width that only matters once the MLP is trained."""
    if domain is None or domain.image_features is None:
        return model_cfg
    width = int(domain.image_features.shape[1])
    if width != model_cfg.image_feature_dim:
        log.info("image_feature_dim %d -> %d (the domain's image_features.npy)", model_cfg.image_feature_dim, width)
        model_cfg = dataclasses.replace(model_cfg, image_feature_dim=width)
    return model_cfg


def fresh_plm(hf_dir: str | os.PathLike, model_cfg: ModelConfig) -> ReoLM:
    """A fresh Reo-LM on a plain HF checkpoint for zero-shot use: top adapters averaged, and the new
    parameters drawn from :data:`PLM_SEED` (the global RNG untouched), so the weights are the same
    on every call; ``reolm export backbone`` saves exactly these."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PLM_SEED)
        return ReoLM.from_backbone(hf_dir, dataclasses.replace(model_cfg, top_routing="mean"))


def load_plm(folder: str | os.PathLike, cfg: Any = None, domain: Domain | None = None) -> ReoLMRecommender:
    """Loader of ``plm-zeroshot``: a plain HF checkpoint (model settings from ``cfg.reolm.model``, a
    :class:`~reolm.finetune.config.FinetuneConfig`, defaults when None; the image MLP sized to
    ``domain``) or the export ``reolm export backbone`` wrote of one."""
    section = cfg.reolm if cfg is not None else ReoLMSection()
    if is_reolm_export(folder):
        model = ReoLM.from_pretrained(folder, overrides={"top_routing": "mean"})
    else:
        model = fresh_plm(folder, sized_for_domain(section.model, domain))
    return ReoLMRecommender(model, load_tokenizer(folder), section=section)


# ----------------------------------------------------------------------------- recommender

class ReoLMRecommender(nn.Module):
    """Reo-LM behind the evaluation interface (cosine / temperature scores)."""

    similarity = "cosine"

    def __init__(self, model: ReoLM, tokenizer: Any, *, section: ReoLMSection | None = None, progress: bool = True):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer  # renders the bound domain's items and gives the collator its special ids
        self.section = section or ReoLMSection()
        self.progress = progress
        self.register_buffer("item_table", None, persistent=False)  # frozen item vectors (stage 2)
        # Transductive ID rows [num_items, H] added to the content vectors (add_item_ids); None = off.
        self.register_parameter("item_ids", None)
        # items that occur in training (fine-tuning losses only); None = all items
        self.register_buffer("train_items", None, persistent=False)
        self.tokens: ItemTokenTable | None = None
        self.images: ImageFeatureTable | None = None
        self.eval_collate: PackedCollator | None = None
        self._encoded: tuple[tuple, torch.Tensor] | None = None  # (weights key, item vectors)
        self._bf16_copy: tuple[tuple, ReoLM] | None = None          # (weights key, CPU inference copy)
        self.requested_precision = "auto"
        self.last_encoding: dict[str, Any] = {}
        self._host_memory = FreedMemoryBound()  # encoding batches of every shape fragments the CPU heap
        # Which vision model's features the image MLP was trained on (the export fine-tuning starts
        # from; loaders of saved folders set their own), and where that was recorded.
        self.vision_from = self.section.init
        self.vision: VisionIdentity | None = trained_vision(self.section.init)

    # -- binding to a domain ----------------------------------------------------------------
    def bind(self, domain: Domain) -> "ReoLMRecommender":
        """Read (or build) the domain's token table and image features; items are rows of them."""
        cfg = self.model.config
        images = domain_image_table(domain, cfg)
        if domain.image_features is not None:
            check_same_vision(self.vision, VisionIdentity.of_table(images), f"the Reo-LM at {self.vision_from}",
                              f"{domain.path or domain.name}/image_features.npy")
        self.bind_tables(domain_token_table(domain, self.tokenizer, cfg, self.progress), images)
        check_item_rows({"item table": self.item_table, "item ID embedding": self.item_ids}, domain, "the saved")
        return self

    def bind_tables(self, tokens: ItemTokenTable, images: ImageFeatureTable) -> "ReoLMRecommender":
        """Items are the rows of these tables (a domain's, or the serving catalogue's rows of a request)."""
        self.tokens, self.images = tokens, images
        self.eval_collate = self.collator(mlm_probability=0.0)
        self._encoded = None  # other items now: the cached catalogue encoding no longer applies
        return self

    def collator(self, mlm_probability: float, seed: int | None = None) -> PackedCollator:
        if self.tokens is None:
            raise RuntimeError("bind(domain) first: the recommender reads item content from it")
        return PackedCollator.from_config(self.tokens, self.images, self.tokenizer, self.model.config,
                                          mlm_probability=mlm_probability, seed=seed)

    @property
    def num_items(self) -> int:
        return len(self.tokens) if self.tokens is not None else 0

    # -- Recommender interface ----------------------------------------------------------------
    @property
    def temperature(self) -> float:
        return float(self.model.config.temperature)

    @property
    def default_max_history(self) -> int:
        return self.section.eval_max_history_items

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- precision ------------------------------------------------------------------------------
    def set_precision(self, requested: str) -> "ReoLMRecommender":
        """``auto``, ``fp32`` or ``bf16`` (:mod:`reolm.precision`), resolved for the current device."""
        self.requested_precision = numerics.check_precision(requested)
        return self

    @property
    def precision(self) -> str:
        """What the model computes in on its device now: ``fp32`` or ``bf16`` as requested and
        resolved; a model cast on purpose (bf16 for serving, fp64 in parity tests) computes in
        its own dtype whatever was requested."""
        dtype = self.model.embeddings.LayerNorm.weight.dtype
        if dtype != torch.float32:
            return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
        return numerics.resolve_precision(self.requested_precision, self.device,
                                          hidden_size=self.model.backbone_config.hidden_size)

    def autocast(self) -> Any:
        """The context training forwards run in: bf16 autocast for ``bf16``, nothing for ``fp32``."""
        return numerics.autocast(self.device, self.precision)

    def inference_encoder(self) -> ReoLM:
        """The model to encode with, without gradient: on CPU in bf16, a bf16 copy of the current
        weights (made again whenever a weight changes); otherwise the model itself, run under
        :meth:`autocast`."""
        model = self.model
        if self.precision != "bf16" or self.device.type != "cpu" or \
                model.embeddings.LayerNorm.weight.dtype != torch.float32:
            return model
        key = self._weights_key()
        if self._bf16_copy is None or self._bf16_copy[0] != key:
            self._bf16_copy = None  # free the old copy before making the new one
            self._bf16_copy = (key, numerics.inference_copy(model))
        return self._bf16_copy[1]

    @torch.no_grad()
    def _encode(self, batch: PackedBatch) -> torch.Tensor:
        """Pooled float32 vectors of ``batch`` (already on the device), without gradient."""
        encoder = self.inference_encoder()
        was_training = encoder.training
        encoder.eval()  # encoding is inference: no dropout, whatever mode training left the model in
        try:
            with self.autocast() if encoder is self.model else contextlib.nullcontext():
                return encoder.encode(batch).float()
        finally:
            encoder.train(was_training)
            self._host_memory.check()

    # -- transductive ID rows --------------------------------------------------------------------
    def add_item_ids(self, num_items: int) -> "ReoLMRecommender":
        """Zero ID rows for ``num_items`` items (``reolm.item_id_embedding``).  Only the rows of items in a
        training loss get a gradient, so an item never seen in training keeps exactly 0: its vector is
        its content vector, as for an item added after training."""
        hidden = int(self.model.backbone_config.hidden_size)
        self.item_ids = nn.Parameter(torch.zeros(num_items, hidden, device=self.device))
        return self

    def with_item_ids(self, vectors: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Content ``vectors`` (fp32 result) plus the ID rows of ``items`` (every item, in order, when
        None); ``vectors`` unchanged without ID rows."""
        if self.item_ids is None:
            return vectors
        rows = self.item_ids if items is None else self.item_ids[items]
        if rows.shape != vectors.shape:
            raise ValueError(f"{vectors.shape[0]} item vectors but {rows.shape[0]} ID rows: the ID rows belong "
                             f"to the {self.item_ids.shape[0]} items of the domain trained on")
        return vectors.float() + rows

    @torch.no_grad()
    def item_vectors(self) -> torch.Tensor:
        """The frozen item table when set, else every item encoded with the current weights; plus the
        ID rows of the transductive variant."""
        content = self.item_table if self.item_table is not None else self.encode_all_items()
        return self.with_item_ids(content)

    @torch.no_grad()
    def encode_all_items(self) -> torch.Tensor:
        """[num_items, H] float32 vectors of every item (eval mode, no gradient).

        Items are encoded in length-sorted packed batches (similar lengths together: little
        padding in the grid attention backends, one [CLS]-only last layer per batch) and put back
        in item order.  The result is reused while no weight has changed since (every in-place
        update, an optimiser step or ``load_state_dict``, bumps a tensor's version counter).
        ``last_encoding`` records items, tokens, seconds and tokens/s of the latest encoding.
        """
        key = self._weights_key()
        if self._encoded is not None and self._encoded[0] == key:
            return self._encoded[1]
        start = time.perf_counter()
        lengths = np.diff(self.tokens.offsets) + 2  # + [CLS] + the image token
        order = np.argsort(lengths, kind="stable")
        vectors = torch.cat([self._encode_item_chunk(chunk) for chunk in self._item_chunks(order)])  # eval mode
        vectors = vectors.index_select(0, torch.from_numpy(np.argsort(order)).to(vectors.device))
        seconds = time.perf_counter() - start
        tokens = int(lengths.sum())
        self.last_encoding = {"items": self.num_items, "tokens": tokens, "seconds": round(seconds, 3),
                              "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}
        self._encoded = (key, vectors)
        return vectors

    def _weights_key(self) -> tuple:
        """Identity and version of every parameter and buffer: changes whenever a weight does."""
        return tuple((id(t), t._version, t.device) for t in (*self.model.parameters(), *self.model.buffers()))

    def _item_chunks(self, order: np.ndarray) -> Iterator[list[int]]:
        size = self.section.item_batch_size
        starts = range(0, self.num_items, size)
        for start in tqdm(starts, desc="encode items", unit="batch", disable=not self.progress, leave=False):
            yield order[start:start + size].tolist()

    def _encode_item_chunk(self, items: list[int]) -> torch.Tensor:
        return self._encode(self.eval_collate.collate_items(items).to(self.device))

    def user_vectors(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        return self._encode(self.eval_collate([SequenceExample(h) for h in histories]).history.to(self.device))


# ----------------------------------------------------------------------------- saved folder

def save_reolm_folder(folder: str | os.PathLike, rec: ReoLMRecommender, *, model_name: str, domain: Domain,
                      cfg: Any, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder`` (export + item table + config + descriptor) next to it, then swap it in."""
    folder = Path(folder)
    with atomic_dir(folder) as partial:
        vision = vision_record(_vision_after_training(rec, domain))
        rec.model.save_pretrained(partial, rec.tokenizer, extra_config=vision)
        files = {key: save_item_rows(partial / name, key, rows)
                 for key, name, rows in (("item_vectors", ITEM_VECTORS, rec.item_table),
                                         ("item_id_embedding", ITEM_ID_EMBEDDING, rec.item_ids))}
        save_resolved(cfg, partial)
        write_json(partial / DESCRIPTOR, descriptor(model_name, domain.num_items, domain.name, to_dict(rec.section),
                                                    {**files, **dict(extra or {})}))
    return folder


def _vision_after_training(rec: ReoLMRecommender, domain: Domain) -> VisionIdentity | None:
    """The vision model behind the image MLP once trained on ``domain``: the pre-trained one, or
    (from a fresh backbone) the one that computed the domain's features."""
    if rec.vision is not None or domain.image_features is None or rec.images is None:
        return rec.vision
    return VisionIdentity.of_table(rec.images)


def _with_vision_of(rec: ReoLMRecommender, folder: Path) -> ReoLMRecommender:
    rec.vision_from, rec.vision = str(folder), trained_vision(folder)
    return rec


def load_reolm(folder: str | os.PathLike, cfg: Any = None, domain: Domain | None = None) -> ReoLMRecommender:
    """Loader (:mod:`reolm.saved.kinds`) of ``reolm``, ``reolm-nopretrain``, their ``-id`` variants
    (saved runs) and ``reolm-zeroshot`` (a bare pre-trained export); bind it to a domain before use.
    ``cfg`` and ``domain`` are not needed: the folder holds every setting."""
    folder = Path(folder)
    if not (folder / DESCRIPTOR).is_file():  # a pre-trained export: zero-shot
        # Its gate was never trained (pre-training routes by domain) and the new domain has no
        # adapter of its own: the mean of the adapters uses what pre-training learned, guessing nothing.
        model = ReoLM.from_pretrained(folder, overrides={"top_routing": "mean"})
        return _with_vision_of(ReoLMRecommender(model, load_tokenizer(folder), section=ReoLMSection()), folder)
    desc = read_descriptor(folder)
    model = ReoLM.from_pretrained(folder, overrides={"top_routing": "gate"})
    section = from_dict(ReoLMSection, desc.get("model_config") or {})
    rec = _with_vision_of(ReoLMRecommender(model, load_tokenizer(folder), section=section), folder)
    rows, width = int(desc["num_items"]), int(model.backbone_config.hidden_size)
    rec.item_table = load_item_rows(folder, desc, "item_vectors", rows, width)
    item_ids = load_item_rows(folder, desc, "item_id_embedding", rows, width)
    if rec.section.item_id_embedding and item_ids is None:
        raise ValueError(f"{folder / DESCRIPTOR}: model_config.item_id_embedding is true but 'item_id_embedding' "
                         f"names no {ITEM_ID_EMBEDDING}")
    if item_ids is not None:
        rec.item_ids = nn.Parameter(item_ids, requires_grad=False)
    return rec
