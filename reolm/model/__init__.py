"""The Reo-LM encoder (see docs/model.md).

Public API: :class:`ReoLM` (``from_backbone``, ``from_pretrained``, ``save_pretrained``,
``encode``, ``score``, ``mlm_loss``, ``set_routing``), :class:`ModelConfig`,
:class:`EncoderOutput`, the attention interface (:func:`attention`, :class:`AttentionLayout`,
:func:`resolve_backend`) and :class:`CheckpointError`.  The scores and losses every stage shares
are in :mod:`reolm.model.objectives`; loading, saving and the strict key check of checkpoints in
:mod:`reolm.model.hf_checkpoint`.
"""

from reolm.model.attention import AttentionLayout, attention, resolve_backend
from reolm.model.config import ModelConfig
from reolm.model.encoder import EncoderOutput, MixtureOfAdapters, ReoLM
from reolm.model.hf_checkpoint import BackboneConfig, CheckpointError

__all__ = ["ReoLM", "ModelConfig", "EncoderOutput", "MixtureOfAdapters", "AttentionLayout", "attention",
           "resolve_backend", "BackboneConfig", "CheckpointError"]
