"""Recformer / UniSRec / MISSRec interop: import their processed data, export ours to RecBole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_domain
from reolm.data.domain import read_domain, write_domain
from reolm.data.interop import InteropError, export_unisrec, import_recformer, import_unisrec

INTER_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


def write_recformer(folder: Path, smap: dict, train: dict, val: dict, test: dict, meta: dict, umap=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("smap", smap), ("train", train), ("val", val), ("test", test), ("meta_data", meta)):
        (folder / f"{name}.json").write_text(json.dumps(data))
    if umap is not None:
        (folder / "umap.json").write_text(json.dumps(umap))
    return folder


def test_import_recformer_exact(tmp_path):
    # As Recformer's finetune_data/process.py writes it: 0-based LabelField indices, users with < 3
    # items in train only, meta_data.json covering every item of the category.
    src = write_recformer(
        tmp_path / "Scientific",
        smap={"A1": 0, "A2": 1, "A3": 2, "A4": 3},
        train={"0": [0, 1], "1": [2], "2": [3, 1], "3": [0, 9]},
        val={"0": [2], "1": [0], "3": [1]},
        test={"0": [3], "1": [1], "3": [2]},
        meta={"A1": {"title": "Pipette", "brand": "Lab", "category": "Industrial Lab"},
              "A2": {"title": "Beaker", "brand": None, "category": "Industrial"},
              "A3": {"title": "Gloves", "brand": "Safe", "category": "Industrial Safety"},
              "A4": {"title": "Goggles", "brand": "Safe", "category": "Industrial Safety"},
              "Z9": {"title": "not in smap", "brand": "", "category": ""}},
        umap={"userA": 0, "userB": 1, "userC": 2, "userD": 3})
    domain, report = import_recformer(src, "Scientific")
    assert domain.smap == {"A1": 0, "A2": 1, "A3": 2, "A4": 3}
    assert domain.umap == {"userA": 0, "userB": 1, "userC": 2, "userD": 3}
    assert domain.train == {0: [0, 1], 1: [2], 2: [3, 1], 3: [0]}
    assert domain.val == {0: [2], 1: [0], 3: [1]} and domain.test == {0: [3], 1: [1], 3: [2]}
    assert domain.meta["A2"] == {"category": "Industrial", "title": "Beaker", "brand": ""}
    assert dict(report.dropped) == {"interaction_of_item_not_in_smap": 1, "meta_of_item_not_in_smap": 1}
    assert report.examples["interaction_of_item_not_in_smap"] == ["train.json: user 3, item 9"]
    assert any("1 user(s) have a train sequence but no val/test" in n for n in report.notes)
    assert report.kept == {"users": 4, "items": 4, "interactions": 12}


def test_import_recformer_one_based_and_cli(tmp_path):
    src = write_recformer(tmp_path / "r", smap={"A": 1, "B": 2, "C": 3},
                          train={"0": [1, 2], "1": [3]}, val={"0": [3], "1": [1]}, test={"0": [1], "1": [2]},
                          meta={k: {"title": k} for k in "ABC"})
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "reolm", "import", "recformer", str(src), "--name", "R",
                             "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "indices start at 1; shifted to 0-based" in result.stdout
    domain = read_domain(out)
    assert domain.smap == {"A": 0, "B": 1, "C": 2} and domain.train == {0: [0, 1], 1: [2]}
    assert domain.umap == {"0": 0, "1": 1}  # no umap.json: ids are the indices
    stats = subprocess.run([sys.executable, "-m", "reolm", "stats", "--json", str(out)], capture_output=True,
                           text=True, check=True)
    assert json.loads(stats.stdout)[0]["interactions"] == 7


def unisrec_files(folder: Path, name: str, sequences: dict[int, list[int]], item_ids: list[str],
                  user_ids: list[str], texts: dict[str, str]) -> Path:
    """Atomic files written the way UniSRec's convert_to_atomic_files does (augmented train rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    train = {u: s[:-2] for u, s in sequences.items()}
    with open(folder / f"{name}.train.inter", "w") as fh:
        fh.write(INTER_HEADER)
        for u, seq in train.items():
            for k in range(1, len(seq)):
                fh.write(f"{u}\t{' '.join(map(str, seq[:-k][-50:]))}\t{seq[-k]}\n")
    with open(folder / f"{name}.valid.inter", "w") as fh:
        fh.write(INTER_HEADER)
        fh.writelines(f"{u}\t{' '.join(map(str, train[u][-50:]))}\t{s[-2]}\n" for u, s in sequences.items())
    with open(folder / f"{name}.test.inter", "w") as fh:
        fh.write(INTER_HEADER)
        fh.writelines(f"{u}\t{' '.join(map(str, s[:-1][-50:]))}\t{s[-1]}\n" for u, s in sequences.items())
    (folder / f"{name}.item2index").write_text("".join(f"{i}\t{k}\n" for k, i in enumerate(item_ids)))
    (folder / f"{name}.user2index").write_text("".join(f"{u}\t{k}\n" for k, u in enumerate(user_ids)))
    (folder / f"{name}.text").write_text("item_id:token\ttext:token_seq\n"
                                         + "".join(f"{k}\t{v}\n" for k, v in texts.items()))
    return folder


def test_import_unisrec_rebuilds_long_sequences_and_features(tmp_path):
    long_seq = [k % 7 for k in range(80)]  # > 50: histories in the files are cut
    sequences = {0: long_seq, 1: [3, 4, 5], 2: [6, 0, 1, 2]}
    items = [f"B{k:03d}" for k in range(7)]
    src = unisrec_files(tmp_path / "Office", "Office", sequences, items, ["ua", "ub", "uc"],
                        {"B000": "Pen. Office Supplies. Bic.", "B001": "Paper.", "ZZZ": "unknown item."})
    feats = np.zeros((7, 4), dtype=np.float32)
    feats[[0, 2, 5]] = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    feats.tofile(src / "Office.feat3CLS")
    np.ones((7, 16), dtype=np.float32).tofile(src / "Office.feat1CLS")
    domain, report = import_unisrec(src, "Office")
    assert domain.smap == {b: k for k, b in enumerate(items)} and domain.umap == {"ua": 0, "ub": 1, "uc": 2}
    for u, seq in sequences.items():
        assert domain.train[u] == seq[:-2] and domain.val[u] == [seq[-2]] and domain.test[u] == [seq[-1]]
    assert domain.meta["B000"]["title"] == "Pen. Office Supplies. Bic." and domain.meta["B003"]["title"] == ""
    assert domain.has_image.tolist() == [True, False, True, False, False, True, False]
    np.testing.assert_array_equal(domain.image_features[2], [5, 6, 7, 8])
    assert report.dropped["text_of_unknown_item"] == 1
    assert report.read["train_rows"] == 77 + 0 + 1 and report.kept["items_with_image_features"] == 3
    assert any("feat1CLS ignored" in n for n in report.notes)


def test_import_unisrec_bad_inputs(tmp_path):
    src = unisrec_files(tmp_path / "X", "X", {0: [0, 1, 2, 3, 0, 1], 1: [1, 2, 3]}, ["a", "b", "c", "d"], ["u", "v"], {})
    np.zeros(4 * 3 + 1, dtype=np.float32).tofile(src / "X.feat3CLS")
    with pytest.raises(InteropError, match=r"X.feat3CLS: 52 bytes is not 4 items x d float32 values"):
        import_unisrec(src, "X")
    (src / "X.feat3CLS").unlink()
    lines = (src / "X.train.inter").read_text().splitlines()
    (src / "X.train.inter").write_text("\n".join(lines[:1] + ["0\t0 3\t2" if l.startswith("0\t0 1\t2") else l
                                                              for l in lines[1:]]) + "\n")
    with pytest.raises(InteropError, match=r"X.train.inter, user 0: rows do not form one sequence"):
        import_unisrec(src, "X")
    (src / "X.train.inter").write_text("user\titems\n")
    with pytest.raises(InteropError, match=r"X.train.inter:1: header must have the columns"):
        import_unisrec(src, "X")


def test_unisrec_export_then_import_round_trip(tmp_path):
    domain = make_domain("rt", num_users=12, num_items=30, min_len=3, max_len=9)
    domain.train[3] = [k % 30 for k in range(70)]  # longer than the 50-item history window
    domain.has_image = np.arange(30) % 4 != 0
    domain.image_features = np.random.default_rng(1).normal(size=(30, 6)).astype(np.float16)
    write_domain(domain, tmp_path / "rt")
    result = subprocess.run([sys.executable, "-m", "reolm", "export", "unisrec", str(tmp_path / "rt"),
                             "--out", str(tmp_path / "recbole")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    header = (tmp_path / "recbole" / "rt.test.inter").read_text().splitlines()[0]
    assert header == INTER_HEADER.strip()
    back, report = import_unisrec(tmp_path / "recbole", "rt")
    assert back.train == domain.train and back.val == domain.val and back.test == domain.test
    assert back.smap == domain.smap and back.umap == domain.umap
    np.testing.assert_array_equal(back.has_image, domain.has_image)
    np.testing.assert_array_equal(back.image_features[domain.has_image], domain.image_features[domain.has_image])
    assert back.meta["rt-i1"]["title"] == "item 1 of topic 1. cat1. brand1."
    assert not report.dropped
    result = subprocess.run([sys.executable, "-m", "reolm", "import", "unisrec", str(tmp_path / "recbole"),
                             "--name", "rt", "--out", str(tmp_path / "again")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    stats = subprocess.run([sys.executable, "-m", "reolm", "stats", "--json", str(tmp_path / "again")],
                           capture_output=True, text=True, check=True)
    row = json.loads(stats.stdout)[0]
    assert (row["users"], row["items"], row["images"]) == (12, 30, int(domain.has_image.sum()))
    assert row["interactions"] == domain.num_interactions()


def test_import_unisrec_without_index_files_uses_tokens(tmp_path):
    src = unisrec_files(tmp_path / "Y", "Y", {0: [2, 0, 1, 2], 1: [1, 2, 0]}, ["p", "q", "r"], ["s", "t"],
                        {"0": "zero.", "2": "two."})
    (src / "Y.item2index").unlink()
    (src / "Y.user2index").unlink()
    domain, _ = import_unisrec(src, "Y")
    assert domain.smap == {"0": 0, "1": 1, "2": 2} and domain.umap == {"0": 0, "1": 1}
    assert domain.train == {0: [2, 0], 1: [1]} and domain.val == {0: [1], 1: [2]} and domain.test == {0: [2], 1: [0]}
    assert domain.meta["2"]["title"] == "two." and domain.meta["1"]["title"] == ""


def test_import_recformer_unescapes_html_by_default_and_records_it(tmp_path):
    from reolm.cli import main
    src = write_recformer(tmp_path / "r", smap={"A": 0, "B": 1}, train={"0": [0, 1], "1": [1]},
                          val={"0": [1], "1": [0]}, test={"0": [0], "1": [1]},
                          meta={"A": {"title": "12&quot; Saw &amp; Blade", "brand": ["Ace", "&lt;Co&gt;"]},
                                "B": {"title": "Plain drill"}})
    for flag, title, brand, flagged in (([], '12" Saw & Blade', "Ace <Co>", True),
                                        (["--no-unescape-html"], "12&quot; Saw &amp; Blade", "Ace &lt;Co&gt;", False)):
        out = tmp_path / f"out{len(flag)}"
        assert main(["import", "recformer", str(src), "--name", "R", "--out", str(out), *flag]) == 0
        domain = read_domain(out)
        assert (domain.meta["A"]["title"], domain.meta["A"]["brand"]) == (title, brand)
        assert domain.meta["B"]["title"] == "Plain drill"
        ingest = json.loads((out / "domain.json").read_text())["ingest"]
        assert ingest["options"] == {"unescape_html": flagged}
        assert any("unescaped HTML entities in the text of 1 item(s)" in n
                   for n in ingest["report"]["notes"]) == flagged
