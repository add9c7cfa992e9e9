"""A trained Reo-LM as the two towers a service needs: an item encoder and a history encoder.

``RUN_OR_EXPORT`` is what evaluation loads (:func:`reolm.saved.resolve`), of a servable kind:

* a **pre-trained export** (``ReoLM.save_pretrained``): one model, top adapters averaged (the
  zero-shot routing of ``reolm-zeroshot``), encodes both items and histories;
* a **fine-tuning run** (``RUN_DIR`` or ``RUN_DIR/best``): the history encoder is ``best/``.
  Its items are the frozen stage-2 table, which the *best stage-1 weights* encoded
  (``docs/finetune.md``); stage 2 then moved the shared weights, so a new item must be encoded
  by those stage-1 weights (``RUN_DIR/stage1``) to land in the same space as the table. When
  ``best/`` is stage 1's own weights the two towers are one model. Without ``stage1/`` the
  catalogue is re-encoded by the final weights instead, so catalogue and new items still agree.
* a **transductive run** (``reolm-id``, ``reolm.item_id_embedding``): the catalogue's vectors are
  those content vectors plus ``best/``'s learned ID rows, as evaluation scores them. An item added
  live has no ID row: it is its content vector alone, like an item never seen in training, until
  a retrained model is served.

Encoding goes through :class:`~reolm.finetune.reolm_recommender.ReoLMRecommender` (the code that
fine-tuning and evaluation use), bound to a small table holding only the rows a request needs.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from reolm.data.domain import Domain
from reolm.data.tables import ImageFeatureTable, ItemTokenTable, tokenize_items_batched, tokenizer_key
from reolm.io import sha256_file
from reolm.precision import resolve_device
from reolm.saved import KINDS, check_item_rows, resolve

__all__ = ["ServingModel", "REOLM_KINDS", "weights_digest"]

log = logging.getLogger(__name__)
REOLM_KINDS = tuple(name for name, kind in KINDS.items() if kind.family == "reolm")


def weights_digest(folder: Path) -> str:
    """sha256 of a model folder's ``model.safetensors`` (its identity in an index folder)."""
    return sha256_file(folder / "model.safetensors")


@dataclass
class _Tower:
    rec: Any  # a ReoLMRecommender (reolm.finetune.reolm_recommender), as its kind's loader returns it
    folder: Path
    digest: str


class ServingModel:
    """Item and history encoders of one saved Reo-LM, plus what identifies them."""

    def __init__(self, path: str | Path, device: str = "auto", item_batch_size: int = 256,
                 precision: str = "auto"):
        self.path = Path(path).resolve()
        self.requested_precision = precision
        saved = resolve(self.path)
        folder, desc = saved.folder, saved.descriptor
        self.kind = saved.name
        if self.kind not in REOLM_KINDS:
            raise ValueError(f"{path}: a {self.kind!r} model cannot be served: the service encodes new items "
                             f"from their text and image, which only Reo-LM does (kinds: {', '.join(REOLM_KINDS)})")
        self.device = resolve_device(device)
        user = self._load(folder)
        self.frozen_table: torch.Tensor | None = user.rec.item_table
        user.rec.item_table = None  # the service searches FAISS, not this tensor
        # The ID rows scored with the frozen table (best/'s, whichever tower encodes items).
        self.item_ids: torch.Tensor | None = None if user.rec.item_ids is None else user.rec.item_ids.detach().cpu()
        self.item_source = "encoded"
        item = user
        if self.frozen_table is not None:
            if desc.get("stage") == 1:  # best/ holds stage 1's own weights: one model
                self.item_source = "frozen table (best = stage-1 weights)"
            elif (folder.parent / "stage1").is_dir():
                item = self._load(folder.parent / "stage1")
                self.item_source = "frozen table (stage-1 weights)"
            else:
                log.warning("%s: no stage1/ folder next to it; the catalogue is re-encoded by the final weights "
                            "(not the frozen stage-2 table) so that new items land in the same space", folder)
                self.frozen_table = None
        self.user, self.item = user, item
        for tower in {id(t): t for t in (user, item)}.values():
            tower.rec.section = dataclasses.replace(tower.rec.section, item_batch_size=item_batch_size)
        key_u, key_i = self._tokenizer_key(user), self._tokenizer_key(item)
        if key_u != key_i:
            raise ValueError(f"{user.folder} and {item.folder} carry different tokenizers")

    def _load(self, folder: Path) -> _Tower:
        rec = resolve(folder).load()
        rec.progress = False
        rec = rec.to(self.device).eval().set_precision(self.requested_precision)
        if rec.precision == "bf16" and self.device.type == "cpu":
            rec.model.to(torch.bfloat16)  # inference only: no fp32 master weights to keep
        return _Tower(rec, Path(folder).resolve(), weights_digest(Path(folder)))

    @property
    def precision(self) -> str:
        """What the towers compute in (``fp32`` or ``bf16``, :mod:`reolm.precision`)."""
        return self.user.rec.precision

    @staticmethod
    def _tokenizer_key(tower: _Tower) -> str:
        return tokenizer_key(tower.rec.tokenizer, (), 0)

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> Any:
        return self.item.rec.model.config

    @property
    def tokenizer(self) -> Any:
        return self.item.rec.tokenizer

    @property
    def temperature(self) -> float:
        return float(self.user.rec.temperature)

    @property
    def max_history(self) -> int:
        """History items the model reads (its evaluation setting)."""
        return int(self.user.rec.default_max_history)

    @property
    def vocab_size(self) -> int:
        return int(self.item.rec.model.backbone_config.vocab_size)

    @property
    def image_dim(self) -> int:
        return int(self.config.image_feature_dim)

    def identity(self) -> dict[str, Any]:
        """What produced an index's vectors (recorded in it, checked when serving)."""
        return {"path": str(self.path), "kind": self.kind,
                "user_encoder": {"path": str(self.user.folder), "weights_sha256": self.user.digest},
                "item_encoder": {"path": str(self.item.folder), "weights_sha256": self.item.digest},
                "item_vectors": self.item_source + (" + ID rows" if self.item_ids is not None else ""),
                "temperature": self.temperature,
                "hidden_size": int(self.user.rec.model.backbone_config.hidden_size),
                "max_history": self.max_history}

    def check_identity(self, recorded: Mapping[str, Any], where: str) -> None:
        """Refuse an index whose vectors another model produced (scores would be meaningless)."""
        mine = self.identity()
        for tower in ("user_encoder", "item_encoder"):
            theirs = (recorded.get(tower) or {}).get("weights_sha256")
            if theirs != mine[tower]["weights_sha256"]:
                raise ValueError(f"{where}: the index was built by {recorded.get(tower, {}).get('path')!r} "
                                 f"({tower} sha256 {str(theirs)[:12]}) but --model is {mine[tower]['path']!r} "
                                 f"(sha256 {mine[tower]['weights_sha256'][:12]}): rebuild it with "
                                 f"`reolm embed items --model {self.path}`")

    # ------------------------------------------------------------------ catalogue
    def bind_domain(self, domain: Domain) -> tuple[ItemTokenTable, ImageFeatureTable]:
        """The domain's token and image tables, read (or built) the way fine-tuning reads them."""
        self.item.rec.bind(domain)
        return self.item.rec.tokens, self.item.rec.images

    @torch.no_grad()
    def catalogue_vectors(self, domain: Domain) -> torch.Tensor:
        """[num_items, H] float32: the frozen table of a fine-tuned run, else every item encoded; plus
        the ID rows of a transductive run."""
        self.bind_domain(domain)
        check_item_rows({"frozen item table": self.frozen_table, "item ID embedding": self.item_ids}, domain,
                        f"{self.user.folder}: the")
        content = self.frozen_table if self.frozen_table is not None else self.item.rec.encode_all_items()
        return content.float().cpu() + (self.item_ids if self.item_ids is not None else 0.0)

    def tokenize(self, items: Sequence[Mapping[str, str]], attributes: Sequence[str]) -> ItemTokenTable:
        """New items' token rows, rendered exactly as the catalogue's (``tokenize_items_batched``)."""
        ids, types, starts, lengths = tokenize_items_batched(self.tokenizer, items, attributes,
                                                             int(self.config.max_attr_tokens))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return ItemTokenTable(ids, types, starts, offsets, tuple(attributes))

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_items(self, tokens: ItemTokenTable, images: ImageFeatureTable) -> torch.Tensor:
        """[n, H] float32 vectors of the n rows of these tables (``[CLS] item``, item tower)."""
        rec = self.item.rec.bind_tables(tokens, images)
        return rec.encode_all_items().cpu()

    @torch.no_grad()
    def encode_histories(self, tokens: ItemTokenTable, images: ImageFeatureTable,
                         histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """[B, H] float32 history vectors; histories index rows of the tables (oldest first, already cut)."""
        rec = self.user.rec.bind_tables(tokens, images)
        return rec.user_vectors(histories).cpu()
