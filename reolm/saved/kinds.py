"""Model kinds: each kind's loader and trainer, and what a path given as a model is.

A *loader* is ``load(folder: Path, cfg: FinetuneConfig | None = None, domain: Domain | None = None)
-> Recommender``: the model saved at ``folder`` on the CPU, not yet bound to a domain (its
:meth:`~reolm.eval.evaluate.Recommender.bind` does that). ``cfg`` and ``domain`` matter only to a
model built rather than loaded (``plm-zeroshot`` on a plain HF checkpoint: its settings from
``cfg.reolm``, its image MLP sized to the domain's features); every other loader ignores them.

A *trainer* is ``train(cfg: FinetuneConfig, domain: Domain, run_dir: Path, *, init, backbone)
-> dict`` that trains, keeps ``run_dir/best/`` and returns the metrics.json document it wrote.

Both are named as ``module:function`` and imported on first use, so this table costs nothing
to import. Reo-LM (``reolm/finetune/reolm_trainer.py``) saves ``best/`` as an HF-style export plus
the descriptor; a bare pre-trained export (no descriptor) is evaluated as ``reolm-zeroshot``; a
plain HF BERT/RoBERTa checkpoint, or the export ``reolm export backbone`` makes of one
(``origin: backbone``), as ``plm-zeroshot``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from reolm.saved.folder import (BACKBONE_ORIGIN, FORMAT_VERSION, export_origin, is_hf_backbone, is_reolm_export,
                                read_descriptor, resolve_model_dir)

__all__ = ["Kind", "KINDS", "PLM_ZEROSHOT", "SavedModel", "kind", "get_trainer", "resolve"]

PLM_ZEROSHOT = "plm-zeroshot"
Family = Literal["id", "reolm", "plm"]


@dataclass(frozen=True)
class Kind:
    """One model kind: how its saved folder loads and, for a kind ``launch/finetune.py`` trains, how."""

    name: str
    #: ``module:function`` of the loader (module docstring)
    loader: str
    #: ``id``: items are rows of the model's own tables; ``reolm``: a Reo-LM export (+ fine-tuning),
    #: servable; ``plm``: a plain HF checkpoint's text encoding (zero-shot)
    family: Family
    #: ``module:function`` of the trainer; None for a kind only loaded (a variant or a zero-shot model)
    trainer: str | None = None

    @property
    def content(self) -> bool:
        """Items are encoded from their text and images (so a new item needs no training, and
        ``precision`` applies); the ID models always score in fp32."""
        return self.family != "id"

    def load(self, folder: str | Path, cfg: Any = None, domain: Any = None) -> Any:
        """The model saved at ``folder`` (module docstring)."""
        return _function(self.loader)(Path(folder), cfg, domain)

    def train(self) -> Callable[..., dict]:
        if self.trainer is None:
            raise ValueError(f"model {self.name!r} is not trained by itself; trained kinds: "
                             f"{', '.join(k.name for k in KINDS.values() if k.trainer)}")
        return _function(self.trainer)


_BASELINE = "reolm.baselines.registry:load_baseline"
_BASELINE_TRAINER = "reolm.finetune.baseline_trainer:train_baseline"
_REOLM = "reolm.finetune.reolm_recommender:load_reolm"

KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("pop", _BASELINE, "id", _BASELINE_TRAINER),
    Kind("sasrec", _BASELINE, "id", _BASELINE_TRAINER),
    Kind("sasrec-textinit", _BASELINE, "id"),            # sasrec with --item-init
    Kind("gru4rec", _BASELINE, "id", _BASELINE_TRAINER),
    Kind("bert4rec", _BASELINE, "id", _BASELINE_TRAINER),
    Kind("reolm", _REOLM, "reolm", "reolm.finetune.reolm_trainer:train_reolm"),
    Kind("reolm-nopretrain", _REOLM, "reolm"),          # reolm from a plain checkpoint
    Kind("reolm-id", _REOLM, "reolm"),                  # transductive (reolm.item_id_embedding)
    Kind("reolm-nopretrain-id", _REOLM, "reolm"),
    Kind("reolm-zeroshot", _REOLM, "reolm"),            # a bare pre-trained export
    Kind(PLM_ZEROSHOT, "reolm.finetune.reolm_recommender:load_plm", "plm"),
)}


def _function(ref: str) -> Callable[..., Any]:
    module, _, func = ref.partition(":")
    return getattr(importlib.import_module(module), func)


def kind(name: str) -> Kind:
    if name not in KINDS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(KINDS)}")
    return KINDS[name]


def get_trainer(name: str) -> Callable[..., dict]:
    """The trainer of model kind ``name`` (imported now: fails fast for a kind without one)."""
    return kind(name).train()


@dataclass(frozen=True)
class SavedModel:
    """A model on disk: its folder and descriptor (one made up for an export or HF checkpoint)."""

    folder: Path
    descriptor: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.descriptor["model"])

    @property
    def kind(self) -> Kind:
        return kind(self.name)

    def load(self, cfg: Any = None, domain: Any = None) -> Any:
        """The model, by its kind's loader (module docstring)."""
        return self.kind.load(self.folder, cfg, domain)

    def check_domain(self, domain: Any, where: str) -> None:
        """Refuse a domain with another item count than the one the model was trained on (a
        zero-shot model was trained on none: it takes any domain)."""
        if "num_items" in self.descriptor and int(self.descriptor["num_items"]) != domain.num_items:
            raise ValueError(f"{where} was trained on {self.descriptor['num_items']} items but domain "
                             f"{domain.name!r} has {domain.num_items}: wrong domain?")


def resolve(path: str | Path) -> SavedModel:
    """A run directory, its ``best/``, any saved model folder, a bare Reo-LM export
    (``reolm-zeroshot``, or ``plm-zeroshot`` when made from a plain checkpoint) or a plain HF
    checkpoint (``plm-zeroshot``); the last three have no fine-tuning."""
    try:
        folder = resolve_model_dir(path)
    except FileNotFoundError as err:
        if is_reolm_export(path):
            plain = export_origin(path) == BACKBONE_ORIGIN
            return SavedModel(Path(path), {"model": PLM_ZEROSHOT if plain else "reolm-zeroshot",
                                           "format_version": FORMAT_VERSION})
        if is_hf_backbone(path):
            return SavedModel(Path(path), {"model": PLM_ZEROSHOT, "format_version": FORMAT_VERSION})
        raise FileNotFoundError(f"{err}; nor is it a Reo-LM export or a BERT/RoBERTa checkpoint "
                                f"(config.json with model_type reolm or one of bert, roberta, ...)") from None
    return SavedModel(folder, read_descriptor(folder))
