"""How many of a user's most recent items a model reads: every history-length setting, in one place.

A history is always cut to its most recent items.  The settings that say how many, and where:

=================================  =======  ==========================================================
key                                default  what it cuts
=================================  =======  ==========================================================
``model.max_history_items``        50       Reo-LM's capacity: every history the packing collator
                                            builds (also cut by ``model.max_tokens``); the
                                            item-position table has ``max_history_items + 1``
                                            rows, so an export fixes it.
``reolm.max_history_items``        10       Reo-LM fine-tuning, training: the history of each
                                            (history -> next item) prefix.
``reolm.eval_max_history_items``   9        Reo-LM at evaluation and serving, unless
                                            ``eval.max_history_items`` is set.
``eval.max_history_items``         null     evaluation of any model; null = the model's own default
                                            (the key above for Reo-LM, ``max_history_items`` of a
                                            baseline).
``<baseline>.max_history_items``   50 / 49  SASRec / GRU4Rec / BERT4Rec: evaluation reads this many
                                            items (BERT4Rec then appends its ``[MASK]``); a training
                                            window holds ``max_history_items + 1`` items (inputs and
                                            their next-item targets; BERT4Rec's cloze window).
=================================  =======  ==========================================================

Reo-LM trains on 10 items and evaluates on 9 as the reference implementation does.  The model's
budget (``model.max_history_items`` and ``model.max_tokens``) is applied in one place, the packing
collator's ``select_history``: pre-training hands it whole histories, fine-tuning and evaluation the
most recent items their own keys above choose.  The old names (``model.max_items``,
``reolm.max_history``, ``reolm.eval_max_history``, ``eval.max_history``, the baselines'
``max_len``) are refused in config files with a "renamed to" message and upgraded when a saved run
or an export is read back (:class:`reolm.config.Renamed`); BERT4Rec's ``max_len`` counted the
``[MASK]`` position, so its ``max_history_items`` is ``max_len - 1``.
"""

from __future__ import annotations

from typing import Any

from reolm.config import param

__all__ = ["history_items_param"]


def history_items_param(default: int | None, doc: str, ge: int = 1) -> Any:
    """A history-length field: at least ``ge`` items (or null where the type allows it)."""
    return param(default, doc, ge=ge)
