from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from reolm.data.domain import DomainError, domain_stats, read_domain, write_domain

from conftest import make_domain


def test_write_read_round_trip(tmp_path, tiny_domain):
    tiny_domain.has_image = np.arange(tiny_domain.num_items) % 3 != 0
    tiny_domain.image_features = np.random.default_rng(0).normal(size=(tiny_domain.num_items, 8))
    write_domain(tiny_domain, tmp_path / "d")
    back = read_domain(tmp_path / "d")
    assert back.train == tiny_domain.train and back.val == tiny_domain.val and back.test == tiny_domain.test
    assert back.smap == tiny_domain.smap and back.meta == tiny_domain.meta
    assert back.image_features.dtype == np.float16
    np.testing.assert_array_equal(back.has_image, tiny_domain.has_image)
    assert not list((tmp_path / "d").glob(".*"))  # no temporary (reolm.io names them .NAME.tmp) left


def test_stats_counts(tiny_domain):
    s = domain_stats(tiny_domain)
    expected = sum(len(v) + 2 for v in tiny_domain.train.values())
    assert s["interactions"] == expected
    assert s["users"] == 30 and s["items"] == 40
    assert s["avg_seq_len"] == pytest.approx(expected / 30)


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: d.train.__setitem__(0, [999]), "item 999 outside"),
    (lambda d: d.train.__setitem__(1, []), "empty sequence"),
    (lambda d: d.val.__setitem__(77, [1]), "user 77 outside"),
    (lambda d: d.meta.pop("tiny-i3"), "meta_data.json lacks 1 item"),
])
def test_validation_names_the_problem(tiny_domain, corrupt, message):
    corrupt(tiny_domain)
    with pytest.raises(DomainError, match=message):
        tiny_domain.validate()


def test_malformed_json_names_file_and_line(tmp_path, tiny_domain):
    write_domain(tiny_domain, tmp_path / "d")
    (tmp_path / "d" / "val.json").write_text('{"0": [1],\n "1": [2,,]}')
    with pytest.raises(DomainError, match=r"val.json: malformed JSON at line 2"):
        read_domain(tmp_path / "d")


def test_stats_cli_markdown_and_json(tmp_path):
    write_domain(make_domain("alpha"), tmp_path / "alpha")
    write_domain(make_domain("beta", num_users=10), tmp_path / "beta")
    out = subprocess.run([sys.executable, "-m", "reolm", "stats", str(tmp_path / "alpha"), str(tmp_path / "beta")],
                         capture_output=True, text=True, check=True).stdout
    assert "| alpha | 30 | 40 |" in out and "| beta | 10 | 40 |" in out
    rows = json.loads(subprocess.run([sys.executable, "-m", "reolm", "stats", "--json", str(tmp_path / "beta")],
                                     capture_output=True, text=True, check=True).stdout)
    assert rows[0]["users"] == 10


def test_resolve_domain_dirs_expands_corpus_and_skips_files(tmp_path):
    from reolm.data.domain import resolve_domain_dirs

    write_domain(make_domain("alpha"), tmp_path / "c" / "alpha")
    write_domain(make_domain("beta"), tmp_path / "c" / "beta")
    (tmp_path / "c" / "corpus.json").write_text(json.dumps({"domains": [{"name": "beta"}, {"name": "alpha"}]}))
    notes = []
    got = resolve_domain_dirs(sorted((tmp_path / "c").iterdir()), warn=notes.append)
    assert [p.name for p in got] == ["alpha", "beta"] and len(notes) == 1 and "corpus.json" in notes[0]
    assert [p.name for p in resolve_domain_dirs([tmp_path / "c"])] == ["beta", "alpha"]
    with pytest.raises(DomainError, match="not a processed domain folder"):
        resolve_domain_dirs([tmp_path])
