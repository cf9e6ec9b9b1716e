"""optimize.app.params_file: search_params.json keeps other keys, refuses (never overwrites) a file that
is not a JSON object, and is replaced atomically. The entries a run writes are checked in
tests/app/test_cli.py, reading them back in tests/app/test_generate.py."""

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


# A run's save of its best, killed (SIGKILL) half-way through the temporary file while it holds the lock.
_KILLED_SAVING = """
import json, os, signal, sys
from optimize.app import params_file

def half(data, f, **kwargs):
    f.write('{"tiny:ddim:8:max:0.5": {"par')
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

json.dump = half
params_file.update_search_params(sys.argv[1], "tiny:ddim:8:max:0.5", {"params": {"deepcache": True}})
"""


def test_kill_9_while_saving_the_best_leaves_the_old_file_and_nothing_in_the_way(tmp_path):
    """kill -9 during a run's write of search_params.json: the old file whole; the lock it held does not
    block the next write, which removes the dead writer's temporary file and keeps every other key."""
    import signal
    import subprocess
    import sys
    import threading

    path = tmp_path / "search_params.json"
    old = {"some:other:key": {"params": {}, "speedup": 1.0}}
    path.write_text(json.dumps(old))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", _KILLED_SAVING, str(path)], env=dict(os.environ, PYTHONPATH=root),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert json.loads(path.read_text()) == old
    (left,) = glob.glob(str(tmp_path / ".search_params.json.*.tmp"))
    assert open(left).read().startswith('{"tiny:ddim:8:max:0.5"')
    assert params_file.read_search_params(str(path)) == old  # what the next run checks first

    writer = threading.Thread(target=params_file.update_search_params,
                              args=(str(path), "tiny:ddim:8:max:0.5", {"params": {"deepcache": False}}), daemon=True)
    writer.start()
    writer.join(timeout=30)
    assert not writer.is_alive(), "the next write waited for the killed writer's lock"
    assert json.loads(path.read_text()) == {**old, "tiny:ddim:8:max:0.5": {"params": {"deepcache": False}}}
    assert not glob.glob(str(tmp_path / ".search_params.json.*.tmp"))
