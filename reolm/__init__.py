"""Reo-LM: recommendation-oriented multi-modal language model pre-training.

The library is organised by stage of the data path (see docs/architecture.md):
``reolm.data`` (domains, shards, item tables, collator), ``reolm.vision``
(image features), ``reolm.model`` (encoder, adapters, attention backends),
``reolm.train`` (DeepSpeed pre-training), ``reolm.finetune``, ``reolm.eval``
and ``reolm.baselines``.
"""

__version__ = "0.1.0"
