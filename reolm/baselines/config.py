"""Config sections of the ID-based baselines (defaults follow the original papers' settings)."""

from __future__ import annotations

from dataclasses import dataclass

from reolm.config import Renamed, param
from reolm.history import history_items_param

__all__ = ["SASRecConfig", "GRU4RecConfig", "BERT4RecConfig"]


@dataclass(frozen=True)
class SASRecConfig:
    """SASRec (Kang & McAuley 2018): causal self-attention over item-ID embeddings."""

    renamed_keys = {"max_len": Renamed("max_history_items")}

    hidden: int = param(64, "Item embedding / hidden size.", ge=1)
    blocks: int = param(2, "Number of self-attention blocks.", ge=1)
    heads: int = param(2, "Attention heads per block (must divide hidden).", ge=1)
    max_history_items: int = history_items_param(50, "Most recent history items read (= positions); a "
                                                   "training window holds max_history_items + 1 items.",
                                               ge=2)
    dropout: float = param(0.2, "Dropout on embeddings, attention and feed-forward.", ge=0, lt=1)
    loss: str = param("ce", "ce = softmax cross-entropy over all items at every position; bce = the "
                      "original binary loss with one uniformly sampled negative per position.",
                      choices=("ce", "bce"))
    item_init: str = param("", "Text-initialised SASRec (recorded as sasrec-textinit; same as --item-init): a "
                               "Reo-LM run or export, or a plain HF checkpoint, whose item vectors of the domain "
                               "(PCA to hidden, scaled to the init std; docs/evaluation.md) replace the random "
                               "item rows before training. Items never seen in training keep their text-derived "
                               "rows exactly, and the item table gets no weight decay. \"\" = random rows.")

    def check(self) -> None:
        from reolm.config import ConfigError
        if self.hidden % self.heads:
            raise ConfigError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")


@dataclass(frozen=True)
class GRU4RecConfig:
    """GRU4Rec (Hidasi et al. 2016): a GRU over item-ID embeddings, next-item prediction."""

    renamed_keys = {"max_len": Renamed("max_history_items")}

    hidden: int = param(64, "GRU hidden size and item embedding size.", ge=1)
    layers: int = param(1, "Number of GRU layers.", ge=1)
    max_history_items: int = history_items_param(50, "Most recent history items read; a training window "
                                                   "holds max_history_items + 1 items.", ge=2)
    dropout: float = param(0.3, "Dropout on the input embeddings.", ge=0, lt=1)
    loss: str = param("ce", "ce = softmax cross-entropy over all items at every step; bce = binary loss "
                      "with one uniformly sampled negative per step.", choices=("ce", "bce"))


@dataclass(frozen=True)
class BERT4RecConfig:
    """BERT4Rec (Sun et al. 2019): bidirectional self-attention trained with a cloze task."""

    renamed_keys = {"max_len": Renamed("max_history_items", note="= max_len - 1: the [MASK] position is "
                                                             "no longer counted", convert=lambda n: n - 1)}

    hidden: int = param(64, "Item embedding / hidden size.", ge=1)
    blocks: int = param(2, "Number of bidirectional self-attention blocks.", ge=1)
    heads: int = param(2, "Attention heads per block (must divide hidden).", ge=1)
    max_history_items: int = history_items_param(49, "Most recent history items read before the appended "
                                                   "[MASK] (positions = max_history_items + 1, the cloze "
                                                   "training window's length).")
    dropout: float = param(0.1, "Dropout on embeddings, attention and feed-forward (the paper's 0.1; "
                           "more keeps the cloze task on its initial plateau much longer).", ge=0, lt=1)
    mask_prob: float = param(0.2, "Probability of replacing an item by [MASK] during training "
                             "(at least one item per sequence is masked).", gt=0, le=1)
    mask_last_prob: float = param(0.5, "Probability that the item always masked in a training sequence is "
                                  "its last one (as at inference, where [MASK] follows the history) "
                                  "rather than a random one.", ge=0, le=1)
    dupe: int = param(5, "Differently masked copies of every training sequence per epoch (the original "
                      "code's dupe_factor): the cloze task gives few targets per sequence.", ge=1)

    def check(self) -> None:
        from reolm.config import ConfigError
        if self.hidden % self.heads:
            raise ConfigError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")

