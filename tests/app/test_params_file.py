"""optimize.app.params_file: search_params.json keeps other keys, refuses (never overwrites) a file that
is not a JSON object, and is replaced atomically. The entries a run writes are checked in
tests/test_cli.py, reading them back in tests/test_generate.py."""

from __future__ import annotations

import glob
import json
import os

import pytest

from optimize.study import files

from optimize.app import params_file

from optimize.study import storage


def test_update_search_params_keeps_other_keys(tmp_path):
    path = str(tmp_path / "sub" / "sp.json")
    params_file.update_search_params(path, "a", {"x": 1})
    params_file.update_search_params(path, "b", {"y": [1, 2]})
    params_file.update_search_params(path, "a", {"x": 2})
    with open(path) as f:
        assert json.load(f) == {"a": {"x": 2}, "b": {"y": [1, 2]}}
    assert not glob.glob(str(tmp_path / "sub" / ".search_params.*.tmp"))


@pytest.mark.parametrize("content", [b"{oops", b"[1, 2, 3]", b'"a string"', b"\xff\xfe"])
def test_update_search_params_refuses_bad_file(tmp_path, content):
    path = tmp_path / "sp.json"
    path.write_bytes(content)
    with pytest.raises(storage.StorageError, match="not overwritten"):
        params_file.update_search_params(str(path), "a", {"x": 1})
    assert path.read_bytes() == content


def test_atomic_write_json_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "search_params.json"
    files.atomic_write_json(str(path), {"old": 1})
    old = path.read_bytes()
    assert json.loads(old) == {"old": 1}

    def half_then_fail(data, f, **kwargs):
        f.write('{"new": ')  # a crash mid-write
        raise RuntimeError("disk full")

    monkeypatch.setattr(files.json, "dump", half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        files.atomic_write_json(str(path), {"new": 2})
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["search_params.json"]  # no temp file left behind
    with pytest.raises(RuntimeError, match="disk full"):
        params_file.update_search_params(str(path), "k", {"new": 2})
    assert path.read_bytes() == old
    assert not glob.glob(str(tmp_path / ".search_params.*.tmp"))
    monkeypatch.undo()
    files.atomic_write_json(str(path), {"new": 2})
    assert json.loads(path.read_text()) == {"new": 2}
