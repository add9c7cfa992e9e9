from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from reolm.cli import main
from reolm.data.domain import domain_stats, read_domain, write_domain
from reolm.data.synth import MIN_SEQ_LEN, PRESETS, generate_corpus, preset_config


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    assert main(["synth", "--preset", "tiny", "--out", str(out), "--seed", "3", "--quiet"]) == 0
    return out


def test_tiny_counts_roles_and_coverage(tiny_corpus):
    cfg = PRESETS["tiny"]
    roles = []
    for spec in cfg.domains:
        d = read_domain(tiny_corpus / spec.name)          # validates indices, meta, splits
        s = domain_stats(d)
        assert (s["users"], s["items"], s["interactions"]) == (spec.num_users, spec.num_items,
                                                               spec.num_interactions)
        assert 0.55 < s["image_coverage"] < 0.85
        assert all(len(seq) >= MIN_SEQ_LEN - 2 for seq in d.train.values())
        assert set(d.val) == set(d.test) == set(d.train)
        imaged = {p.stem for p in (tiny_corpus / spec.name / "images").iterdir()}
        assert imaged == {i for i, idx in d.smap.items() if d.has_image[idx]}
        roles.append(d.extra["role"])
    assert roles == ["pretrain", "pretrain", "pretrain", "downstream"]


def test_same_seed_same_bytes_other_seed_differs(tiny_corpus, tmp_path):
    generate_corpus(preset_config("tiny"), tmp_path / "a", seed=3, progress=False)
    generate_corpus(preset_config("tiny"), tmp_path / "b", seed=4, progress=False)
    assert _tree_hash(tmp_path / "a") == _tree_hash(tiny_corpus)
    assert _tree_hash(tmp_path / "b") != _tree_hash(tiny_corpus)


def test_streamed_files_are_byte_identical_to_write_domain(tiny_corpus, tmp_path):
    src = tiny_corpus / "Books"
    write_domain(read_domain(src), tmp_path / "Books")
    for name in ("train.json", "val.json", "test.json", "smap.json", "umap.json", "meta_data.json",
                 "domain.json", "has_image.npy"):
        assert (src / name).read_bytes() == (tmp_path / "Books" / name).read_bytes(), name


def _topic_of(domain) -> dict[int, str]:
    """Topic word of every item whose text shows it (category 'Domain > Word'), else ''."""
    ids = domain.item_ids()
    out = {}
    for idx, item_id in enumerate(ids):
        cat = domain.meta[item_id]["category"].split(" > ")[1]
        out[idx] = "" if cat == "General" else cat
    return out


def test_sequences_follow_a_shared_topic_chain(tiny_corpus):
    """The most frequent next topic of each topic is the same in every domain (shared Markov chain)
    and predicts the next visible topic far better than chance."""
    successors = []
    for spec in PRESETS["tiny"].domains:
        d = read_domain(tiny_corpus / spec.name)
        topic = _topic_of(d)
        counts: dict[str, dict[str, int]] = {}
        for u, seq in d.train.items():
            full = seq + d.val[u] + d.test[u]
            for a, b in zip(full, full[1:]):
                if topic[a] and topic[b]:
                    counts.setdefault(topic[a], {}).setdefault(topic[b], 0)
                    counts[topic[a]][topic[b]] += 1
        best = {t: max(c, key=c.get) for t, c in counts.items()}
        hit = sum(c[best[t]] for t, c in counts.items()) / sum(sum(c.values()) for c in counts.values())
        assert hit > 0.4, (spec.name, hit)   # chance is 1/8
        successors.append(best)
    common = set.intersection(*(set(b) for b in successors))
    agree = sum(all(b[t] == successors[0][t] for b in successors) for t in common)
    assert agree >= 0.75 * len(common)


def test_hidden_topic_items_have_images(tiny_corpus):
    d = read_domain(tiny_corpus / "Toys")
    topic = _topic_of(d)
    hidden = [idx for idx, t in topic.items() if not t]
    assert hidden and all(d.has_image[idx] for idx in hidden)


def test_no_images_flag_and_exact_paper_totals(tmp_path):
    assert main(["synth", "--preset", "tiny", "--out", str(tmp_path / "t"), "--no-images", "--quiet"]) == 0
    assert not (tmp_path / "t" / "Books" / "images").exists()
    paper = PRESETS["paper"].domains
    assert sum(s.num_users for s in paper) == 3_608_532
    assert sum(s.num_items for s in paper) == 1_022_309
    assert sum(s.num_interactions for s in paper) == 33_572_032
    assert not PRESETS["paper"].images
    info = json.loads((tmp_path / "t" / "corpus.json").read_text())
    assert [x["role"] for x in info["domains"]].count("downstream") == 1
    assert not (tmp_path / "t" / "Books" / "has_image.npy").exists()


def test_image_colour_identifies_the_topic(tiny_corpus):
    """Background colour is a function of the topic and differs between topics (PNG domain: exact)."""
    from PIL import Image

    d = read_domain(tiny_corpus / "Books")
    topic = _topic_of(d)
    colour_of: dict[str, set] = {}
    for item_id, idx in d.smap.items():
        if d.has_image[idx] and topic[idx]:
            with Image.open(d.image_path(item_id)) as img:
                colour_of.setdefault(topic[idx], set()).add(img.convert("RGB").getpixel((0, 0)))
    assert len(colour_of) >= 4 and all(len(c) == 1 for c in colour_of.values())
    assert len({next(iter(c)) for c in colour_of.values()}) == len(colour_of)
