"""`reolm prepare amazon`: Amazon Reviews 2018 files -> processed domain folder."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from reolm.data.amazon import AmazonOptions, IngestError, build_amazon_domain, render_category
from reolm.data.domain import read_domain


def review(user: str, asin: str, time: int, **extra) -> str:
    return json.dumps({"overall": 5.0, "verified": True, "reviewerID": user, "asin": asin,
                       "unixReviewTime": time, "reviewText": "fine", **extra})


def write_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(line + "\n" for line in lines)
    return path


REVIEWS = [
    review("U1", "I1", 100), review("U1", "I2", 200), review("U1", "I3", 300), review("U1", "I4", 400),
    review("U2", "I3", 150), review("U2", "I2", 150),  # same time: file order decides (I3 before I2)
    review("U2", "I5", 300),
    '{"reviewerID": "U9", "asin": "I1", "unixRev',        # line 8: malformed
    json.dumps({"reviewerID": "U9", "asin": "I1"}),       # line 9: no unixReviewTime
    review("U3", "I1", 10), review("U3", "I9", 20), review("U3", "I2", 30),  # I9 has no metadata
    review("U4", "I4", 5), review("U4", "I4", 5),          # exact duplicate
    review("U4", "I1", 6), review("U4", "I6", 7),          # I6's metadata has no title
    review("U4", "I5", 8),
]


def meta(asin: str, title, category=("Toys & Games", "Figures"), brand="Acme", **extra) -> str:
    record = {"asin": asin, "title": title, "brand": brand, "category": list(category),
              "imageURLHighRes": [f"https://img/{asin}.jpg"], **extra}
    return json.dumps(record)


META = [
    meta("I1", "Tom &amp; Jerry   figure", category=("Toys &amp; Games", "Figures", "Action")),
    meta("I2", "Blocks", brand=None),
    # A Python-literal line, as in some published dumps.
    "{'asin': 'I3', 'title': 'Kite', 'brand': 'Sky', 'category': ['Toys & Games', 'Outdoor'], 'imageURL': []}",
    meta("I2", "Blocks again"),      # duplicate asin: first kept
    meta("I4", "Ball"),
    meta("I5", "Doll", category=()),
    meta("I6", ""),                  # no title -> dropped
    meta("I7", "Never reviewed"),
    "{'asin': 'I8', 'title': ",      # malformed (but unreviewed: skipped before parsing)
]


@pytest.fixture
def amazon_files(tmp_path):
    return write_gz(tmp_path / "Toys_5.json.gz", REVIEWS), write_gz(tmp_path / "meta_Toys.json.gz", META)


def test_counts_splits_and_attributes_are_exact(amazon_files):
    reviews, meta_path = amazon_files
    domain, _, report = build_amazon_domain("Toys", reviews, meta_path, AmazonOptions(user_k=3, item_k=0))
    assert domain.umap == {"U1": 0, "U2": 1, "U4": 2}
    assert domain.smap == {"I1": 0, "I2": 1, "I3": 2, "I4": 3, "I5": 4}
    assert domain.train == {0: [0, 1], 1: [2], 2: [3]}
    assert domain.val == {0: [2], 1: [1], 2: [0]}
    assert domain.test == {0: [3], 1: [4], 2: [4]}
    assert domain.meta["I1"] == {"category": "Toys & Games Figures Action", "title": "Tom & Jerry figure",
                                 "brand": "Acme"}
    assert domain.meta["I2"] == {"category": "Toys & Games Figures", "title": "Blocks", "brand": ""}
    assert domain.meta["I3"]["title"] == "Kite" and domain.meta["I5"]["category"] == ""
    assert report.read["review_lines"] == len(REVIEWS) and report.read["interactions"] == 15
    assert dict(report.dropped) == {
        "malformed_review_line": 1, "review_missing_field": 1, "meta_duplicate_asin": 1, "meta_without_title": 1,
        "items_without_usable_meta": 2, "interactions_of_items_without_meta": 2,
        "duplicate_interactions(exact)": 1, "interactions_outside_k_core": 2}
    assert report.examples["malformed_review_line"] == [f"{reviews}:8"]
    assert report.examples["review_missing_field"][0].startswith(f"{reviews}:9")
    assert report.kept == {"users": 3, "items": 5, "interactions": 10}


def test_duplicate_policies(amazon_files):
    reviews, meta_path = amazon_files
    kept = build_amazon_domain("T", reviews, meta_path, AmazonOptions(user_k=3, item_k=0, duplicates="keep"))[0]
    assert kept.train[2] + kept.val[2] + kept.test[2] == [3, 3, 0, 4]  # U4: I4, I4, I1, I5
    # user-item keeps the earliest (user, item) pair: same as exact here, but also drops repeats at other times.
    lines = [review("A", "I1", 1), review("A", "I2", 2), review("A", "I1", 3), review("A", "I3", 4), review("A", "I4", 5)]
    path = write_gz(reviews.parent / "r2.json.gz", lines)
    exact = build_amazon_domain("T", path, meta_path, AmazonOptions(user_k=3, item_k=0))[0]
    once = build_amazon_domain("T", path, meta_path, AmazonOptions(user_k=3, item_k=0, duplicates="user-item"))[0]
    assert exact.num_interactions() == 5 and once.num_interactions() == 4
    assert once.train[0] == [0, 1] and once.val[0] == [2] and once.test[0] == [3]


def test_k_core_is_iterated(tmp_path):
    # Item Z is bought by 2 users only; dropping it leaves user C with 2 items, below user_k = 3.
    lines = [review(u, i, t) for t, (u, i) in enumerate(
        [("A", "X"), ("A", "Y"), ("A", "Z"), ("A", "W"), ("B", "X"), ("B", "Y"), ("B", "W"),
         ("C", "X"), ("C", "Z"), ("C", "Y"), ("D", "X"), ("D", "Y"), ("D", "W")])]
    meta_lines = [meta(a, a) for a in "XYZW"]
    domain, _, report = build_amazon_domain("T", write_gz(tmp_path / "r.gz", lines), write_gz(tmp_path / "m.gz", meta_lines),
                                            AmazonOptions(user_k=3, item_k=3))
    assert set(domain.umap) == {"A", "B", "D"} and set(domain.smap) == {"X", "Y", "W"}
    assert report.dropped["interactions_outside_k_core"] == 4


def test_leave_one_out_for_every_user(tmp_path):
    rng = random.Random(3)
    items = [f"P{i}" for i in range(30)]
    events = [(f"user{rng.randrange(40)}", rng.choice(items), rng.randrange(50)) for _ in range(600)]
    reviews = write_gz(tmp_path / "r.gz", [review(u, i, t) for u, i, t in events])
    meta_path = write_gz(tmp_path / "m.gz", [meta(i, f"title {i}") for i in items])
    domain, _, _ = build_amazon_domain("T", reviews, meta_path, AmazonOptions(user_k=3, item_k=0, duplicates="keep"))
    expected: dict[str, list[str]] = {}
    for user, item, time in sorted(events, key=lambda e: e[2]):  # Python's sort is stable: ties keep file order
        expected.setdefault(user, []).append(item)
    ids = domain.item_ids()
    assert set(domain.umap) == {u for u, s in expected.items() if len(s) >= 3}
    for user_id, u in domain.umap.items():
        seq = expected[user_id]
        assert [ids[i] for i in domain.test[u]] == seq[-1:]
        assert [ids[i] for i in domain.val[u]] == seq[-2:-1]
        assert [ids[i] for i in domain.train[u]] == seq[:-2]


def test_truncated_gzip_fails_clearly_or_keeps_what_was_read(tmp_path):
    rng = random.Random(0)
    lines = [review(f"u{k % 50}", f"I{k % 20}", k, reviewText="".join(rng.choices("abcdefghij", k=200)))
             for k in range(2000)]
    whole = write_gz(tmp_path / "whole.json.gz", lines).read_bytes()
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    meta_path = write_gz(tmp_path / "m.gz", [meta(f"I{k}", f"t{k}") for k in range(20)])
    with pytest.raises(IngestError, match=r"cut\.json\.gz: the compressed data ends or is corrupt after line [\d,]+ .*--allow-truncated"):
        build_amazon_domain("T", cut, meta_path, AmazonOptions(user_k=3, item_k=0))
    domain, _, report = build_amazon_domain("T", cut, meta_path, AmazonOptions(user_k=3, item_k=0, allow_truncated=True))
    read = report.read["truncated:cut.json.gz"]
    assert 0 < read < 2000 and report.read["review_lines"] == read
    assert domain.num_interactions() == read  # every line read was kept (all users >= 3, no duplicates)
    assert any("--allow-truncated" in n for n in report.notes)


def test_category_rendering():
    assert render_category(["Toys &amp; Games", "Figures", "Figures", " "]) == "Toys & Games Figures Figures"
    assert render_category(["Toys & Games", "Figures", "Figures", "Action"], "drop-top") == "Figures Action"
    assert render_category(["Toys & Games"], "drop-top") == "Toys & Games"
    assert render_category(None) == ""


def test_cli_writes_folder_with_report_and_stats_reads_it(amazon_files, tmp_path):
    reviews, meta_path = amazon_files
    out = tmp_path / "Toys"
    cmd = [sys.executable, "-m", "reolm", "prepare", "amazon", "--reviews", str(reviews), "--meta", str(meta_path),
           "--name", "Toys", "--out", str(out), "--user-k", "3", "--item-k", "0", "--category", "drop-top"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "dropped:" in result.stdout and "malformed_review_line=1" in result.stdout
    info = json.loads((out / "domain.json").read_text())
    assert info["counts"] == {"users": 3, "items": 5, "interactions": 10}
    assert info["ingest"]["options"]["category"] == "drop-top" and info["ingest"]["report"]["kept"]["items"] == 5
    assert info["ingest"]["files"]["reviews"]["bytes"] == reviews.stat().st_size
    assert read_domain(out).meta["I1"]["category"] == "Figures Action"
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 1 and "--force" in again.stderr
    stats = subprocess.run([sys.executable, "-m", "reolm", "stats", str(out)], capture_output=True, text=True, check=True)
    assert "| Toys | 3 | 5 | 0 (0.0%) | 10 | 3.33 |" in stats.stdout


def test_plain_files_and_malformed_meta_line(tmp_path):
    reviews = tmp_path / "r.json"  # not compressed
    reviews.write_text("\n".join(review("A", a, t) for t, a in enumerate(["X", "Y", "Z", "W"])) + "\n")
    meta_path = tmp_path / "m.json"
    meta_path.write_text("\n".join([meta("X", "x"), meta("Y", "y"), '{"asin": "Z", "title": "z', meta("W", "w")]) + "\n")
    domain, _, report = build_amazon_domain("T", reviews, meta_path, AmazonOptions(user_k=3, item_k=0))
    assert domain.smap == {"X": 0, "Y": 1, "W": 2} and domain.train == {0: [0]}
    assert report.examples["malformed_meta_line"] == [f"{meta_path}:3"]
    assert report.dropped["interactions_of_items_without_meta"] == 1
