"""optimize.files: a failed write leaves the old file, with its permissions, and no temporary file."""

from __future__ import annotations

import os

import pytest

from optimize import files


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r.html"
    files.atomic_write(str(path), "old")
    path.chmod(0o600)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(str(path), "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.html"]
    monkeypatch.undo()
    files.atomic_write(str(path), b"new \xc3\xa9")
    assert path.read_text(encoding="utf-8") == "new é"
    assert path.stat().st_mode & 0o777 == 0o600  # an existing file keeps its permissions


def test_atomic_write_json_not_serialisable(tmp_path):
    path = tmp_path / "sp.json"
    path.write_text('{"old": 1}')
    with pytest.raises(TypeError):
        files.atomic_write_json(str(path), {"bad": object()})
    assert path.read_text() == '{"old": 1}'
    assert sorted(os.listdir(tmp_path)) == ["sp.json"]
