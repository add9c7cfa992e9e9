"""reolm.io: a failed write leaves the old content; a successful one replaces it whole."""

import json

import numpy as np
import pytest

from reolm import io


def test_write_json_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    io.write_json(target, {"x": 1})
    io.write_json(target, {"x": "é"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"x": "é"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_failed_file_write_keeps_old_content(tmp_path):
    target = tmp_path / "a.txt"
    io.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with io.atomic_open(target) as fh:
            fh.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_dir_replaces_whole_folder_and_keeps_old_on_failure(tmp_path):
    target = tmp_path / "table"
    with io.atomic_dir(target) as tmp:
        (tmp / "one").write_text("1")
        (tmp / "two").write_text("2")
    with pytest.raises(KeyError):
        with io.atomic_dir(target) as tmp:
            (tmp / "three").write_text("3")
            raise KeyError("x")
    assert sorted(p.name for p in target.iterdir()) == ["one", "two"]
    with io.atomic_dir(target) as tmp:
        (tmp / "three").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["three"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table"]


def test_save_npy_round_trips_and_refuses_objects(tmp_path):
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)
    path = io.save_npy(tmp_path / "a.npy", arr)
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), arr)
    with pytest.raises(TypeError, match="object array"):
        io.save_npy(tmp_path / "b.npy", np.array([{"a": 1}], dtype=object))
    assert not (tmp_path / "b.npy").exists()


@pytest.mark.parametrize("content, expect, message", [
    (None, dict, "x.json: missing (run `make x`)"),
    (b'{"a": 1,\n  oops}', dict, "x.json: malformed JSON at line 2 column 3"),
    (b"\xff\xfe{}", dict, "x.json: unreadable (UnicodeDecodeError"),
    (b"[1, 2]", dict, "x.json: expected a JSON object, found list"),
    (b"[" * 100_000 + b"]" * 100_000, None, "x.json: malformed JSON (RecursionError)"),
    (b"1" * 5000, None, "x.json: malformed JSON (ValueError)"),
])
def test_read_json_names_the_file_and_what_is_wrong(tmp_path, content, expect, message):
    from reolm.io import read_json

    class Refused(ValueError):
        pass
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(Refused) as err:
        read_json(path, Refused, expect=expect, missing="run `make x`")
    assert str(err.value).startswith(str(tmp_path / message.split(":")[0]) + ":" + message.split(":", 1)[1])


def test_read_json_returns_the_value(tmp_path):
    from reolm.io import read_json
    (tmp_path / "a.json").write_text('{"k": [1, 2.5, "é"]}', encoding="utf-8")
    (tmp_path / "b.json").write_text("[3]")
    assert read_json(tmp_path / "a.json") == {"k": [1, 2.5, "é"]}
    assert read_json(tmp_path / "b.json", expect=list) == [3]
