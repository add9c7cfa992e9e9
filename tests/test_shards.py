from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from reolm.cli import main
from reolm.data.domain import read_domain, write_domain
from reolm.data.shards import (ShardError, ShardOptions, iter_items, iter_sequences, iter_tar_samples,
                               load_manifest, verify_corpus, write_corpus)
from reolm.data.synth import generate_corpus, preset_config

from conftest import make_domain

DOMAINS = ("Books", "Garden", "Toys", "Scientific")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_corpus(preset_config("tiny"), out, seed=1, progress=False)
    return out


@pytest.fixture(scope="module")
def corpus(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "tiny"
    assert main(["shard", "--out", str(out), "--max-count", "64", "--seed", "5", "--quiet",
                 *[str(synth_dir / d) for d in DOMAINS]]) == 0
    return out


def test_round_trip_items_and_sequences(corpus, synth_dir):
    manifest = load_manifest(corpus)
    items = list(iter_items(corpus, with_images=True))
    assert [r["index"] for r in items] == list(range(manifest["num_items"]))
    train = {(r["domain"], r["user"]): r for r in iter_sequences(corpus, "train")}
    dev = {(r["domain"], r["user"]): r for r in iter_sequences(corpus, "dev")}
    for info, name in zip(manifest["domains"], DOMAINS):
        d = read_domain(synth_dir / name)
        off = info["item_offset"]
        assert (info["name"], info["num_items"], info["num_users"]) == (name, d.num_items, d.num_users)
        for local, item_id in enumerate(d.item_ids()):
            rec = items[off + local]
            assert rec["id"] == item_id and rec["domain_index"] == info["index"]
            assert rec["attributes"] == d.item_attributes(local)
            path = d.image_path(item_id)
            if path is None:
                assert rec["image"] is None
            else:
                assert rec["image"] == (path.suffix[1:], path.read_bytes())
        for user, seq in d.train.items():
            assert train[(info["index"], user)]["items"] == [off + i for i in seq]
            assert dev[(info["index"], user)]["target"] == off + d.val[user][0]
            assert dev[(info["index"], user)]["items"] == [off + i for i in seq]
    assert manifest["totals"]["images"] == sum(r["image"] is not None for r in items)
    assert manifest["totals"]["interactions"] == sum(
        read_domain(synth_dir / n).num_interactions() for n in DOMAINS)
    assert all(e["count"] <= 64 for split in manifest["shards"].values() for e in split)


def test_sequences_are_shuffled_across_domains(corpus):
    first_shard = corpus / load_manifest(corpus)["shards"]["train"][0]["path"]
    domains = {json.loads(s["json"])["domain"] for _, s in iter_tar_samples(first_shard)}
    assert len(domains) >= 3


def _shard_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.tar"))}


def test_deterministic_given_seed(corpus, synth_dir, tmp_path):
    paths = [synth_dir / d for d in DOMAINS]
    write_corpus(paths, tmp_path / "same", ShardOptions(max_count=64, seed=5, progress=False))
    write_corpus(paths, tmp_path / "other", ShardOptions(max_count=64, seed=6, progress=False))
    assert _shard_hashes(tmp_path / "same") == _shard_hashes(corpus)
    other = _shard_hashes(tmp_path / "other")
    assert {k: v for k, v in other.items() if k.startswith("items")} == \
           {k: v for k, v in _shard_hashes(corpus).items() if k.startswith("items")}
    assert {k: v for k, v in other.items() if k.startswith("train")} != \
           {k: v for k, v in _shard_hashes(corpus).items() if k.startswith("train")}


def test_size_limit_and_image_downscale(synth_dir, tmp_path):
    m = write_corpus([synth_dir / "Books"], tmp_path / "c",
                     ShardOptions(max_count=10_000, max_size=30_000, max_image_side=16, progress=False))
    assert len(m["shards"]["items"]) > 1
    assert all(e["bytes"] <= 30_000 for e in m["shards"]["items"])
    from io import BytesIO

    from PIL import Image
    sizes = [Image.open(BytesIO(r["image"][1])).size for r in iter_items(tmp_path / "c", with_images=True)
             if r["image"]]
    assert sizes and max(max(s) for s in sizes) == 16
    assert verify_corpus(tmp_path / "c", progress=False).ok


def test_verify_names_a_corrupted_and_a_truncated_shard(corpus, tmp_path, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    assert main(["verify", str(bad), "--quiet"]) == 0
    manifest = load_manifest(bad)
    victim = bad / manifest["shards"]["items"][1]["path"]
    data = bytearray(victim.read_bytes())
    data[600:1400] = b"\xff" * 800                     # overwrite a byte range in the first samples
    victim.write_bytes(bytes(data))
    truncated = bad / manifest["shards"]["train"][0]["path"]
    truncated.write_bytes(truncated.read_bytes()[:3000])
    capsys.readouterr()
    assert main(["verify", str(bad), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert manifest["shards"]["items"][1]["path"] in err
    assert manifest["shards"]["train"][0]["path"] in err
    assert manifest["shards"]["items"][0]["path"] not in err


def test_verify_detects_payload_change_without_checksums(corpus, tmp_path):
    """Even with sha256 removed from the manifest, a corrupt json member is named by key."""
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    manifest = load_manifest(bad)
    for split in manifest["shards"].values():
        for e in split:
            e.pop("sha256"), e.pop("bytes")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    victim = bad / manifest["shards"]["dev"][0]["path"]
    data = victim.read_bytes()
    pos = data.index(b'{"domain"')
    victim.write_bytes(data[:pos] + b"#" + data[pos + 1:])
    report = verify_corpus(bad, progress=False)
    assert not report.ok and any("corrupt json" in p and "dev/dev-000000.tar: key d" in p
                                 for p in report.problems)


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    d = make_domain("Bad")
    write_domain(d, tmp_path / "Bad")
    (tmp_path / "Bad" / "train.json").write_text('{"0": [1, 2,}')
    assert main(["shard", "--out", str(tmp_path / "c"), str(tmp_path / "Bad"), "--quiet"]) == 1
    assert "train.json: malformed JSON at line 1" in capsys.readouterr().err
    d.train[3] = [1, 999]
    with pytest.raises(ValueError, match="user 3 has item 999"):
        write_domain(d, tmp_path / "Bad")
    # an unreadable image is left out, the item kept, and the run summarises it
    good = make_domain("Good")
    write_domain(good, tmp_path / "Good")
    (tmp_path / "Good" / "images").mkdir()
    (tmp_path / "Good" / "images" / "Good-i3.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="(?s)1 unreadable image.*Good-i3.jpg"):
        m = write_corpus([tmp_path / "Good"], tmp_path / "g", ShardOptions(progress=False))
    assert m["skipped"]["unreadable_images"] == 1 and m["totals"]["items"] == good.num_items
    with pytest.raises(ShardError, match="already holds a corpus"):
        write_corpus([tmp_path / "Good"], tmp_path / "g", ShardOptions(progress=False))
    with pytest.raises(ShardError, match="no manifest.json"):
        load_manifest(tmp_path)
