import json

import pytest

from covipal.io import atomic_output, write_json


class Boom(Exception):
    pass


def test_failed_write_keeps_previous_file(tmp_path):
    out = tmp_path / "result.txt"
    out.write_text("old")
    with pytest.raises(Boom):
        with atomic_output(out) as tmp:
            tmp.write_text("half")
            raise Boom
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_failed_directory_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with atomic_output(tmp_path / "model") as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text("partial")
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_replaces_directory(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale").write_text("x")
    with atomic_output(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-")
        tmp.mkdir()
        (tmp / "fresh").write_text("y")
    assert [p.name for p in out.iterdir()] == ["fresh"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_write_json_creates_parents_sorted(tmp_path):
    path = tmp_path / "metrics" / "eval.json"
    write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')
