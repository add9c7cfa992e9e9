"""reolm tokenizer train: the embedded default tokenizer, trained on item text."""

from __future__ import annotations

import argparse
import time

from reolm.data.tokenizer import TOKENIZER_KINDS

DESCRIPTION = """\
reolm tokenizer train --out DIR (--corpus C | --domain D...) [--kind wordpiece|words|bpe]

Train a tokenizer with the `tokenizers` library on the items' attribute text
("key value" per attribute, empty values as "void") and save it as an HF
tokenizer directory (AutoTokenizer.from_pretrained(DIR) loads it).
wordpiece: BERT-style, lower-cased, [PAD] [UNK] [CLS] [SEP] [MASK].
words: the same format with a vocabulary of every character plus the most
  frequent whole words (ties alphabetical): the same texts always give the
  same file (the trainers of wordpiece/bpe break ties in hash order).
bpe: RoBERTa-style byte-level BPE, <s> <pad> </s> <unk> <mask>."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a tokenizer on item text", description=DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--out", required=True, help="output tokenizer directory")
    src = train.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="shard corpus (folder with manifest.json)")
    src.add_argument("--domain", nargs="+", help="processed domain folder(s)")
    train.add_argument("--kind", choices=TOKENIZER_KINDS, default="wordpiece",
                       help="wordpiece (default), words (whole words + characters, exactly reproducible) or bpe")
    train.add_argument("--vocab-size", type=int, default=8192, help="target vocabulary size (default 8192)")
    train.add_argument("--min-frequency", type=int, default=1, help="minimum pair/word frequency (default 1)")
    train.add_argument("--model-max-length", type=int, default=1024,
                       help="model_max_length saved with the tokenizer (default 1024)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from reolm.data.tokenizer import item_texts, train_tokenizer

    start = time.perf_counter()
    sources = [args.corpus] if args.corpus else args.domain
    out = train_tokenizer(item_texts(sources), args.out, args.kind, args.vocab_size, args.min_frequency,
                          args.model_max_length, progress=not args.quiet)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    print(f"wrote {args.kind} tokenizer with {len(tok):,} tokens to {out} in {time.perf_counter() - start:.1f}s")
    return 0
