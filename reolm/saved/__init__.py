"""A saved model: the folder format (:mod:`reolm.saved.folder`) and the model kinds that load it
(:mod:`reolm.saved.kinds`).

Every kind loads with one call, ``resolve(path).load(cfg, domain)``, and is then bound to the
domain it scores (``Recommender.bind``). Evaluation, fine-tuning (``--item-init``), the item
index and the service all load models this way.
"""

from reolm.saved.folder import (BACKBONE_ORIGIN, DESCRIPTOR, WEIGHTS, check_item_rows, export_origin,
                                is_reolm_export, load_weights, read_descriptor, save_recommender)
from reolm.saved.kinds import KINDS, PLM_ZEROSHOT, Kind, SavedModel, get_trainer, kind, resolve

__all__ = ["BACKBONE_ORIGIN", "DESCRIPTOR", "WEIGHTS", "check_item_rows", "export_origin", "is_reolm_export",
           "load_weights", "read_descriptor", "save_recommender", "KINDS", "PLM_ZEROSHOT", "Kind", "SavedModel",
           "get_trainer", "kind", "resolve"]
