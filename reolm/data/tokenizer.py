"""Train the embedded default tokenizer (WordPiece or byte-level BPE) on item text.

Used where no pre-trained checkpoint's tokenizer is wanted (tests, the CPU demo,
from-scratch runs): it learns a small vocabulary from the items' attribute keys
and values (plus the word ``void`` that stands for an empty value) and saves an
HF tokenizer directory that ``AutoTokenizer.from_pretrained`` loads.

* ``wordpiece``: BERT-style, lower-cased, special tokens [PAD] [UNK] [CLS] [SEP] [MASK];
* ``words``: the same BERT-style WordPiece format, but the vocabulary is chosen by our own
  exact rule (every character seen, as a word start and as a ``##`` continuation, then the most
  frequent whole words, ties broken alphabetically), so the same texts always give the same file;
* ``bpe``: RoBERTa-style byte-level BPE, special tokens <s> <pad> </s> <unk> <mask>.

The ``tokenizers`` trainers (``wordpiece``, ``bpe``) break ties between equally frequent merges in
hash-map order, so their vocabulary can differ from one run to the next; ``words`` cannot.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from reolm.data.tables import VOID_VALUE
from reolm.io import atomic_dir

__all__ = ["TOKENIZER_KINDS", "item_texts", "train_tokenizer"]

TOKENIZER_KINDS = ("wordpiece", "words", "bpe")
WORDPIECE_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                      "mask_token": "[MASK]"}
BPE_SPECIALS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}


def item_texts(sources: Sequence[str | os.PathLike]) -> Iterator[str]:
    """One "key value" line per item attribute of every corpus / domain folder, and "void"."""
    from reolm.data.corpus import iter_source_items

    yield VOID_VALUE
    for root in sources:
        _, rows = iter_source_items(root)
        for attrs in rows:
            for key, value in attrs.items():
                yield f"{key} {value.strip() or VOID_VALUE}"


def _wordpiece(vocab_size: int, min_frequency: int, progress: bool) -> tuple[Any, Any]:
    from tokenizers import trainers

    tok = _bert_style_tokenizer()
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


def _bert_style_tokenizer(vocab: dict[str, int] | None = None) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]") if vocab else models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _whole_word_vocabulary(texts: Iterable[str], vocab_size: int, min_frequency: int) -> list[str]:
    """Specials, every character (word-initial and ``##`` continuation), then the most frequent
    whole words (ties alphabetical) up to ``vocab_size``: a deterministic WordPiece vocabulary in
    which frequent words stay whole and any other word still spells out from characters."""
    from collections import Counter

    shaper = _bert_style_tokenizer({"[UNK]": 0})
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = shaper.normalizer.normalize_str(text)
        counts.update(word for word, _ in shaper.pre_tokenizer.pre_tokenize_str(normalized))
    specials = list(dict.fromkeys(WORDPIECE_SPECIALS.values()))
    chars = sorted({c for word in counts for c in word})
    alphabet = [t for t in chars + ["##" + c for c in chars] if t not in specials]
    room = vocab_size - len(specials) - len(alphabet)
    if room < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(specials) + len(alphabet)} entries "
                         "the specials and the characters of these texts need")
    words = [w for w, n in counts.items() if n >= min_frequency and len(w) > 1 and w not in specials]
    words.sort(key=lambda w: (-counts[w], w))
    return specials + sorted(alphabet + words[:room])


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
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose from {', '.join(TOKENIZER_KINDS)}")
    if vocab_size < 300 and kind == "bpe":
        raise ValueError("a byte-level BPE vocabulary needs at least 300 entries (256 bytes + specials)")
    if kind == "words":
        vocab = _whole_word_vocabulary(texts, vocab_size, min_frequency)
        tok = _bert_style_tokenizer({t: i for i, t in enumerate(vocab)})
    else:
        tok, trainer = (_wordpiece if kind == "wordpiece" else _bpe)(vocab_size, min_frequency, progress)
        tok.train_from_iterator(texts, trainer)
        if kind == "wordpiece":
            _canonical_wordpiece_ids(tok)
    specials = BPE_SPECIALS if kind == "bpe" else WORDPIECE_SPECIALS
    cls, sep = specials["cls_token"], specials["sep_token"]
    if kind != "bpe":
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
    with atomic_dir(out) as tmp:
        fast.save_pretrained(str(tmp))
    return out
