"""Train the embedded default tokenizer (WordPiece or byte-level BPE) on item text.

Used where no pre-trained checkpoint's tokenizer is wanted (tests, the CPU demo,
from-scratch runs): it learns a small vocabulary from the items' attribute keys
and values (plus the word ``void`` that stands for an empty value) and saves an
HF tokenizer directory that ``AutoTokenizer.from_pretrained`` loads.

* ``wordpiece``: BERT-style, lower-cased, special tokens [PAD] [UNK] [CLS] [SEP] [MASK];
* ``bpe``: RoBERTa-style byte-level BPE, special tokens <s> <pad> </s> <unk> <mask>.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from reolm.data.item_table import VOID_VALUE

__all__ = ["TOKENIZER_KINDS", "item_texts", "train_tokenizer"]

TOKENIZER_KINDS = ("wordpiece", "bpe")
WORDPIECE_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                      "mask_token": "[MASK]"}
BPE_SPECIALS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}


def item_texts(sources: Sequence[str | os.PathLike]) -> Iterator[str]:
    """One "key value" line per item attribute of every corpus / domain folder, and "void"."""
    from reolm.data.tables import iter_source_items

    yield VOID_VALUE
    for root in sources:
        _, rows = iter_source_items(root)
        for attrs in rows:
            for key, value in attrs.items():
                yield f"{key} {value.strip() or VOID_VALUE}"


def _wordpiece(vocab_size: int, min_frequency: int, progress: bool) -> tuple[Any, Any]:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
                                        special_tokens=list(dict.fromkeys(WORDPIECE_SPECIALS.values())))
    return tok, trainer


def _canonical_wordpiece_ids(tok: Any) -> None:
    """Renumber a trained WordPiece vocabulary deterministically (specials first, then sorted).

    The trainer hands out ids in hash-map order, so the same texts gave a different
    tokenizer.json on every run: a different token-table key, different embedding rows.
    WordPiece ids carry no meaning, so any fixed order is as good as the trainer's.
    """
    from tokenizers import models

    vocab = tok.get_vocab()
    specials = list(dict.fromkeys(WORDPIECE_SPECIALS.values()))
    ordered = specials + sorted(t for t in vocab if t not in specials)
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(ordered)}, unk_token="[UNK]")


def _bpe(vocab_size: int, min_frequency: int, progress: bool) -> tuple[Any, Any]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return tok, trainer


def train_tokenizer(texts: Iterable[str], out: str | os.PathLike, kind: str = "wordpiece",
                    vocab_size: int = 8192, min_frequency: int = 1, model_max_length: int = 1024,
                    progress: bool = True) -> Path:
    """Train on ``texts`` and save an HF tokenizer directory at ``out`` (written atomically)."""
    import shutil

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose from {', '.join(TOKENIZER_KINDS)}")
    if vocab_size < 300 and kind == "bpe":
        raise ValueError("a byte-level BPE vocabulary needs at least 300 entries (256 bytes + specials)")
    tok, trainer = (_wordpiece if kind == "wordpiece" else _bpe)(vocab_size, min_frequency, progress)
    tok.train_from_iterator(texts, trainer)
    if kind == "wordpiece":
        _canonical_wordpiece_ids(tok)
    specials = WORDPIECE_SPECIALS if kind == "wordpiece" else BPE_SPECIALS
    cls, sep = specials["cls_token"], specials["sep_token"]
    if kind == "wordpiece":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    else:
        tok.post_processor = processors.RobertaProcessing((sep, tok.token_to_id(sep)), (cls, tok.token_to_id(cls)),
                                                          add_prefix_space=False, trim_offsets=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   **{k: v for k, v in specials.items() if k not in ("bos_token", "eos_token")
                                      or kind == "bpe"})
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    fast.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
