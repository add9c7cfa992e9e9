"""Bad input to the data tools, through the commands users run: every case is a one-line error
that names the file and the key or line (exit 1, no traceback), or is skipped with a warning
where the tool documents skipping; ``REOLM_DEBUG=1`` shows the traceback instead.

Also the data stream's handling of faulty shards (unit level; the training run with the same
faults is in ``test_training_data_faults.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from reolm.cli import main
from reolm.data.domain import DomainError, read_domain, write_domain
from reolm.data.shards import ShardOptions, write_corpus
from reolm.train.data import BadSampleCounter, DataError, ShardStream, open_corpus, read_examples

from conftest import make_domain

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    """A valid domain folder and a valid corpus of it, copied by each test before it breaks them."""
    root = tmp_path_factory.mktemp("clean")
    write_domain(make_domain("tiny"), root / "tiny")
    write_corpus([root / "tiny"], root / "corpus", ShardOptions(max_count=20, progress=False))
    return {"domain": root / "tiny", "corpus": root / "corpus"}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _fails(argv: list[str], capsys, *expected: str) -> str:
    """Run ``reolm ARGV``: exit 1 and a one-line error holding every expected fragment."""
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err


# ----------------------------------------------------------------------------- domain folders

def _set(file: str, key: str, value) -> callable:
    return lambda d: _edit_json(d / file, lambda data: data.__setitem__(key, value))


DOMAIN_CASES = {
    # meta value not an object (was AttributeError in read_domain)
    "meta value a string": (_set("meta_data.json", "tiny-i2", "a string"),
                            ["meta_data.json", "item 'tiny-i2'", "expected an object"]),
    "meta value a list": (_set("meta_data.json", "tiny-i2", ["a", "b"]), ["meta_data.json", "item 'tiny-i2'"]),
    "meta attribute a list": (_set("meta_data.json", "tiny-i4", {"title": ["x"]}),
                              ["meta_data.json", "item 'tiny-i4' attribute 'title'"]),
    # domain.json types (was TypeError) and malformed JSON (named no file when sharding)
    "string format_version": (_set("domain.json", "format_version", "1"),
                              ["domain.json", "key format_version", '"1"']),
    "attributes not a list": (_set("domain.json", "attributes", "title"), ["domain.json", "key attributes"]),
    "malformed domain.json": (lambda d: (d / "domain.json").write_text('{"name": "tiny",\n "counts": {'),
                              ["domain.json: malformed JSON at line 2"]),
    # smap index not an integer (was "invalid literal for int()", no file)
    "smap value abc": (_set("smap.json", "tiny-i3", "abc"), ["smap.json", "item 'tiny-i3'", '"abc"']),
    "umap value float": (_set("umap.json", "tiny-u1", 1.5), ["umap.json", "user 'tiny-u1'"]),
    # JSON true is a bool, not item 1 (was accepted silently)
    "item id true": (_set("train.json", "0", [True, 2]), ["train.json", "user 0", "[true, 2]"]),
    "user maps to true": (_set("val.json", "3", True), ["val.json", "user 3"]),
    # bytes that are not UTF-8 (was "codec can't decode", no file)
    "non-UTF-8 bytes": (lambda d: (d / "meta_data.json").write_bytes(
        (d / "meta_data.json").read_bytes().replace(b"item 5 of", b"item \xff5 of", 1)),
        ["meta_data.json: not valid UTF-8 at line 1 column"]),
    # a lone surrogate escape parses but is not text (failed later, when writing shards)
    "lone surrogate": (lambda d: (d / "meta_data.json").write_text(
        (d / "meta_data.json").read_text().replace("item 6 of", "item \\ud800 of", 1)),
        ["meta_data.json", 'key ["tiny-i6"]["title"]', "lone surrogate"]),
    "npy with objects": (lambda d: np.save(d / "has_image.npy", np.array([{}] * 40, dtype=object)),
                         ["has_image.npy", "not a plain numeric .npy array"]),
}


@pytest.mark.parametrize("case", DOMAIN_CASES)
@pytest.mark.parametrize("command", ["stats", "shard"])
def test_bad_domain_folder_names_file_and_key(case, command, clean, tmp_path, capsys):
    breaker, expected = DOMAIN_CASES[case]
    domain = _copy(clean["domain"], tmp_path / "tiny")
    breaker(domain)
    argv = ["stats", str(domain)] if command == "stats" else [
        "shard", "--out", str(tmp_path / "out"), "--quiet", str(domain)]
    err = _fails(argv, capsys, *expected)
    assert err.startswith(f"reolm {command}: error: ") and err.count("\n") == 1


def test_surrogate_pairs_and_numbers_in_meta_are_text(clean, tmp_path):
    """Valid escapes (an emoji as a surrogate pair) and numeric attributes are fine."""
    domain = _copy(clean["domain"], tmp_path / "tiny")
    _edit_json(domain / "meta_data.json",
               lambda m: m["tiny-i1"].update(title="\U0001F600 pair", brand=7, category=None))
    text = (domain / "meta_data.json").read_text()
    (domain / "meta_data.json").write_text(text.replace("\U0001F600", "\\ud83d\\ude00"))
    d = read_domain(domain)
    assert d.meta["tiny-i1"] == {"title": "\U0001F600 pair", "brand": "7", "category": ""}


def test_reolm_debug_shows_the_traceback(clean, tmp_path, monkeypatch, capsys):
    domain = _copy(clean["domain"], tmp_path / "tiny")
    _set("smap.json", "tiny-i3", "abc")(domain)
    monkeypatch.setenv("REOLM_DEBUG", "1")
    with pytest.raises(DomainError, match="smap.json"):
        main(["stats", str(domain)])
    monkeypatch.setenv("REOLM_DEBUG", "0")
    _fails(["stats", str(domain)], capsys, "smap.json")


# ----------------------------------------------------------------------------- corpus manifests

def _entry(key: str, value):
    """An edit of the first train shard entry of a manifest (None deletes the key)."""
    def edit(m):
        entry = m["shards"]["train"][0]
        entry.pop(key) if value is None else entry.__setitem__(key, value)
    return edit


MANIFEST_CASES = {
    # an entry without count (was KeyError in verify)
    "entry without count": (_entry("count", None), "key shards.train[0].count: expected a sample count, "
                                                   "got nothing (the key is missing)"),
    "count true": (_entry("count", True), "key shards.train[0].count"),
    # a path leaving the corpus (was read)
    "path escapes the corpus": (_entry("path", "../../outside.tar"), "key shards.train[0].path"),
    "absolute path": (_entry("path", "/etc/passwd"), "key shards.train[0].path"),
    "path into another split": (_entry("path", "items/items-000000.tar"), "key shards.train[0].path"),
    "domains not a list": (lambda m: m.__setitem__("domains", {}), "key domains"),
    "totals missing dev": (lambda m: m["totals"].pop("dev"), "key totals.dev"),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_bad_manifest_is_refused_by_verify_and_training(case, clean, tmp_path, capsys):
    edit, expected = MANIFEST_CASES[case]
    corpus = _copy(clean["corpus"], tmp_path / "corpus")
    (tmp_path / "outside.tar").write_bytes(b"never read")
    _edit_json(corpus / "manifest.json", edit)
    _fails(["verify", str(corpus), "--quiet"], capsys, f"{corpus / 'manifest.json'}: {expected}")
    # the training stream reads the same manifest through the same checks
    with pytest.raises(DataError, match=r"data\.corpus: .*manifest\.json: key "):
        open_corpus(corpus)


def test_malformed_or_non_utf8_manifest_names_the_line(clean, tmp_path, capsys):
    corpus = _copy(clean["corpus"], tmp_path / "corpus")
    text = (corpus / "manifest.json").read_text()
    (corpus / "manifest.json").write_text(text.replace('"train"', '"train",,', 1))
    _fails(["verify", str(corpus), "--quiet"], capsys, "manifest.json: malformed JSON at line")
    (corpus / "manifest.json").write_bytes(text.encode().replace(b'"name"', b'"n\xe9me"', 1))
    _fails(["tokenizer", "train", "--corpus", str(corpus), "--out", str(tmp_path / "tok"), "--quiet"], capsys,
           "manifest.json: not valid UTF-8 at line")


# ----------------------------------------------------------------------------- images, config

def _save_vit(path: Path) -> Path:
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)).save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def test_image_path_that_is_a_directory_is_no_image(clean, tmp_path, capsys):
    """`reolm tables images --domain` and `reolm shard` treat it as an item without an image."""
    from PIL import Image

    domain = _copy(clean["domain"], tmp_path / "tiny")
    (domain / "images").mkdir()
    for i in (0, 1):
        Image.new("RGB", (20, 20), (40 * i, 90, 10)).save(domain / "images" / f"tiny-i{i}.jpg")
    (domain / "images" / "tiny-i2.jpg").mkdir()  # was IsADirectoryError outside the try
    (domain / "images" / "tiny-i3.png").symlink_to(domain / "images" / "gone.png")  # broken link
    assert main(["tables", "images", "--vision", str(_save_vit(tmp_path / "vit")), "--domain", str(domain),
                 "--quiet"]) == 0
    assert read_domain(domain).has_image.nonzero()[0].tolist() == [0, 1]
    assert main(["shard", "--out", str(tmp_path / "c"), "--quiet", str(domain)]) == 0
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["totals"]["images"] == 2


@pytest.mark.parametrize("value", ["inf", ".inf", "-inf", "nan", ".nan"])
def test_non_finite_rate_is_refused(value, capsys):
    """`optim.lr=inf` passed `gt=0`; every float setting must now be a finite number."""
    assert main(["pretrain", f"optim.lr={value}", "--print-config"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("reolm pretrain: error: ") and "optim.lr: expected a finite number, got " in err
    assert main(["pretrain", "optim.lr=1e-3", "loss.mlm_weight=0", "--print-config"]) == 0


# ----------------------------------------------------------------------------- faulty shards in the stream

def _tar(path: Path, n: int) -> str:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write({"__key__": f"d0_u{i}", "json": json.dumps({"domain": 0, "user": i, "items": [1, 2],
                                                                    "target": 3}).encode()})
    return str(path)


def test_missing_dev_shard_is_skipped_and_counted(tmp_path):
    """read_examples (the dev set) skips a missing or unreadable shard like the train stream."""
    good = _tar(tmp_path / "dev-000000.tar", 6)
    short = _tar(tmp_path / "dev-000002.tar", 4)
    (tmp_path / "dev-000003.tar").mkdir()  # unreadable: a folder
    shards = [str(tmp_path / "dev-000001.tar"), good, short, str(tmp_path / "dev-000003.tar")]
    counter = BadSampleCounter(max_logs=0)
    examples = read_examples(shards, 10, 100, counter, expected_counts={short: 9})
    assert len(examples) == 10 and examples[0].target == 3
    assert counter.counts == {"tar": 2, "truncated": 5}


def test_count_mismatch_is_counted_once_per_shard(tmp_path, caplog):
    """A resampled stream draws the same short shard again and again: one warning, one count."""
    short = _tar(tmp_path / "train-000000.tar", 5)
    longer = _tar(tmp_path / "train-000001.tar", 5)
    counter = BadSampleCounter(max_logs=20)
    stream = ShardStream([short, longer], seed=0, stream_id=0, num_streams=1, resample=True, counter=counter,
                         expected_counts={short: 8, longer: 3})
    it = iter(stream)
    with caplog.at_level("WARNING", logger="reolm.train.data"):
        keys = [next(it)["__key__"] for _ in range(60)]  # about 12 draws
    assert len(keys) == 60 and stream.position.draw >= 10
    assert counter.counts == {"truncated": 3}
    logged = [r.getMessage() for r in caplog.records]
    assert sum("only 5 of the manifest's 8" in m for m in logged) == 1
    assert sum("holds 5 samples, its manifest entry says 3" in m for m in logged) == 1


def test_too_few_shards_error_names_real_flags(tmp_path, capsys):
    shard = _tar(tmp_path / "train-000000.tar", 2)
    with pytest.raises(DataError) as err:
        ShardStream([shard], 0, 0, 2, resample=False, counter=BadSampleCounter(0))
    message = str(err.value)
    assert "--max-count" in message and "--max-size" in message and "--shard-size" not in message
    with pytest.raises(SystemExit):
        main(["shard", "--help"])
    shard_flags = capsys.readouterr().out
    for flag in ("--overwrite", "--max-count", "--max-size"):
        assert flag in message and flag in shard_flags


# ----------------------------------------------------------------------------- more readers of the same files

def test_corrupt_items_shard_names_the_shard_and_key(clean, tmp_path, capsys):
    """Readers other than `reolm verify` (tokenizer, tables) stop with the shard and key named."""
    corpus = _copy(clean["corpus"], tmp_path / "corpus")
    shard = corpus / "items" / "items-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b'{"index"', b'#"index"', 1))
    _fails(["tokenizer", "train", "--corpus", str(corpus), "--out", str(tmp_path / "tok"), "--quiet"], capsys,
           f"{shard}: key 000000020: unreadable sample (JSONDecodeError", "run `reolm verify")


def test_corpus_json_and_recformer_import_check_types(clean, tmp_path, capsys):
    synth = tmp_path / "synth"
    _copy(clean["domain"], synth / "tiny")
    (synth / "corpus.json").write_text(json.dumps({"domains": ["tiny"]}))
    _fails(["stats", str(synth)], capsys, "corpus.json: key domains")
    source = _copy(clean["domain"], tmp_path / "recformer")
    _set("smap.json", "tiny-i5", True)(source)
    _fails(["import", "recformer", str(source), "--name", "tiny", "--out", str(tmp_path / "imported")], capsys,
           "smap.json: item 'tiny-i5': index must be an integer, got a boolean")
