from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reolm.cli import main
from reolm.data.domain import read_domain
from reolm.data.corpus import find_token_table
from reolm.data.shards import ShardOptions, load_manifest, write_corpus
from reolm.data.synth import generate_corpus, preset_config
from reolm.data.tables import ItemTokenTable, TableError, load_tokenizer, tokenize_item, tokenize_items_batched
from reolm.data.tokenizer import item_texts, train_tokenizer

DOMAINS = ("Books", "Toys", "Scientific")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tables")
    generate_corpus(preset_config("tiny", images=False), root / "synth", seed=2, progress=False)
    write_corpus([root / "synth" / d for d in DOMAINS], root / "corpus", ShardOptions(max_count=50, progress=False))
    for kind, size in (("wordpiece", 400), ("bpe", 500)):
        assert main(["tokenizer", "train", "--out", str(root / kind), "--kind", kind, "--vocab-size", str(size),
                     "--corpus", str(root / "corpus")]) == 0
    return {"synth": root / "synth", "corpus": root / "corpus", "wordpiece": root / "wordpiece",
            "bpe": root / "bpe"}


EDGE_ITEMS = [
    {"category": "Books > Fiction", "title": "a tale of two cities", "brand": ""},
    {"category": "", "title": "   ", "brand": None},
    {"category": "x", "title": " ".join(f"word{i}" for i in range(60)), "brand": "Émile & Zoë"},
    {"title": "only a title"},
]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_batched_tokenisation_is_identical_to_tokenize_item(data, kind):
    tok = load_tokenizer(data[kind])
    domain = read_domain(data["synth"] / "Books")
    ids = domain.item_ids()
    items = [domain.item_attributes(i, ids) for i in range(domain.num_items)] + EDGE_ITEMS
    attrs = ("category", "title", "brand")
    b_ids, b_types, b_starts, lengths = tokenize_items_batched(tok, items, attrs, max_attr_tokens=8)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for i, item in enumerate(items):
        ref = tokenize_item(tok, item, attrs, max_attr_tokens=8)
        lo, hi = offsets[i], offsets[i + 1]
        assert b_ids[lo:hi].tolist() == ref[0], i
        assert b_types[lo:hi].tolist() == ref[1], i
        assert b_starts[lo:hi].tolist() == ref[2], i
    lo, hi = offsets[len(items) - 2], offsets[len(items) - 1]
    assert (b_types[lo:hi] == 2).sum() == 8  # the 60-word title is cut to the cap


def test_corpus_token_table_equals_on_the_fly_tokenisation(data):
    tok = load_tokenizer(data["wordpiece"])
    assert main(["tables", "tokens", "--tokenizer", str(data["wordpiece"]), "--corpus", str(data["corpus"]),
                 "--batch-size", "37", "--quiet"]) == 0
    table = find_token_table(data["corpus"], tok)
    manifest = load_manifest(data["corpus"])
    assert len(table) == manifest["num_items"] == sum(d["num_items"] for d in manifest["domains"])
    for info in manifest["domains"]:
        domain = read_domain(data["synth"] / info["name"])
        ids = domain.item_ids()
        for local in range(domain.num_items):
            ref = tokenize_item(tok, domain.item_attributes(local, ids), table.attributes)
            got = table.item(info["item_offset"] + local)
            assert [g.tolist() for g in got] == [list(r) for r in ref]
    assert isinstance(table.ids, np.memmap)


def test_domain_token_table_and_missing_table_error(data, tmp_path):
    tok = load_tokenizer(data["bpe"])
    books = data["synth"] / "Books"
    with pytest.raises(TableError, match="reolm tables tokens"):
        find_token_table(books, tok, max_attr_tokens=16)
    assert main(["tables", "tokens", "--tokenizer", str(data["bpe"]), "--domain", str(books),
                 "--max-attr-tokens", "16", "--quiet"]) == 0
    table = find_token_table(books, tok, max_attr_tokens=16)
    domain = read_domain(books)
    ids = domain.item_ids()
    ref = ItemTokenTable.from_lists(tokenize_item(tok, domain.item_attributes(i, ids), domain.attributes, 16)
                                    for i in range(domain.num_items))
    for name in ("ids", "types", "word_starts", "offsets"):
        np.testing.assert_array_equal(getattr(table, name), getattr(ref, name))
    assert table.types.max() == 3 and table.lengths().max() <= 3 * 16


def test_tokenizer_round_trip_and_special_tokens(data):
    wp = load_tokenizer(data["wordpiece"])
    assert [wp.pad_token, wp.unk_token, wp.cls_token, wp.sep_token, wp.mask_token] == \
           ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    text = read_domain(data["synth"] / "Toys").meta["TOY0000001"]["title"]
    enc = wp(text)
    assert enc.input_ids[0] == wp.cls_token_id and enc.input_ids[-1] == wp.sep_token_id
    assert wp.decode(enc.input_ids, skip_special_tokens=True) == text.lower()
    assert wp.unk_token_id not in wp("void title brand category")["input_ids"]
    bpe = load_tokenizer(data["bpe"])
    assert [bpe.bos_token, bpe.pad_token, bpe.eos_token, bpe.unk_token, bpe.mask_token] == \
           ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert bpe.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]) == [0, 1, 2, 3, 4]
    assert bpe.decode(bpe(" " + text)["input_ids"], skip_special_tokens=True) == " " + text
    assert len(bpe) == 500


def test_tokenizer_train_from_domains(data, tmp_path):
    texts = list(item_texts([data["synth"] / "Scientific"]))
    assert texts[0] == "void" and "brand void" in texts   # empty brands are rendered as "void"
    out = train_tokenizer(texts, tmp_path / "tok", vocab_size=300)
    tok = load_tokenizer(out)
    assert len(tok) <= 300 and sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary left


_TRAIN_WORDS = """
import sys
from reolm.data.tokenizer import train_tokenizer
texts = [f"title alpha beta {'gamma ' * (i % 3)}item{i % 7}" for i in range(200)] + ["brand Zeta-9 void"]
train_tokenizer(texts, sys.argv[1], kind="words", vocab_size=int(sys.argv[2]), progress=False)
"""


def test_words_tokenizer_is_identical_across_processes_and_keeps_frequent_words_whole(tmp_path):
    import os
    import subprocess
    import sys

    outs = []
    for hash_seed in ("1", "2"):      # the trainers of wordpiece/bpe differ between such processes
        out = tmp_path / f"tok{hash_seed}"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        subprocess.run([sys.executable, "-c", _TRAIN_WORDS, str(out), "60"], check=True, env=env)
        outs.append(out)
    assert (outs[0] / "tokenizer.json").read_bytes() == (outs[1] / "tokenizer.json").read_bytes()

    tok = load_tokenizer(outs[0])
    assert len(tok) == 60
    # 55 specials and characters leave room for 5 words: the four most frequent, then the
    # alphabetically first of item0..item4, which tie on count
    assert tok.tokenize("Title ALPHA beta gamma item0") == ["title", "alpha", "beta", "gamma", "item0"]
    assert tok.tokenize("item4") == ["i", "##t", "##e", "##m", "##4"]
    # a word outside the vocabulary still spells out from characters, never [UNK]
    assert tok.tokenize("zebra") == ["z", "##e", "##b", "##r", "##a"]
    assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="smaller than"):
        train_tokenizer(["abcdefghij klmnop"], tmp_path / "small", kind="words", vocab_size=10, progress=False)
