"""optimize.study.files: a failed write leaves the old file, with its permissions, and no temporary file."""

from __future__ import annotations

import os

import pytest

from optimize.study import files


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


# --- temporary files left behind by a killed writer ----------------------------------------------

_WRITER = """
import sys, time
from optimize.study import files

def stuck(f):
    f.write("half of it")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)

files.atomic_write(sys.argv[1], stuck)
"""


def test_temporary_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    """``kill -9`` during an atomic write leaves its temporary file (0600, named with the writer's pid);
    the next write of the same file removes it, since that pid is gone."""
    import signal
    import subprocess
    import sys

    path = tmp_path / "search_params.json"
    path.write_text('{"old": 1}')
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=root))
    try:
        assert writer.stdout.readline() == "writing\n"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    (left,) = [p for p in tmp_path.iterdir() if p.name != "search_params.json"]
    assert left.name.startswith(".search_params.json.") and left.name.endswith(".tmp")
    assert left.read_text() == "half of it" and left.stat().st_mode & 0o777 == 0o600
    assert path.read_text() == '{"old": 1}'
    files.atomic_write(str(path), '{"new": 2}')
    assert [p.name for p in tmp_path.iterdir()] == ["search_params.json"]
    assert path.read_text() == '{"new": 2}'
    assert f".{writer.pid}." in left.name  # how the next write knew its writer was gone


def test_only_stale_temporaries_of_our_own_pattern_are_removed(tmp_path):
    """Removed: this file's temporaries whose writer (on this host) is gone, and any of them older than
    STALE_AFTER (another host's, or one from a version that did not name its writer). Kept: a live
    writer's, a recent one of another host, and every file of another name or pattern."""
    import subprocess
    import time

    host = files._host()
    gone = subprocess.Popen(["true"])
    gone.wait()
    old = time.time() - files.STALE_AFTER - 60
    made = {
        f".sp.json.{host}.{gone.pid}.abcd1234.tmp": (None, "removed"),  # its writer died
        f".sp.json.{host}.{os.getpid()}.abcd1234.tmp": (None, "kept"),  # a live writer (this process)
        f".sp.json.{host}.{os.getpid()}.old12345.tmp": (old, "removed"),  # older than any write takes
        f".sp.json.elsewhere.{gone.pid}.abcd1234.tmp": (None, "kept"),  # another host's pid: age alone
        f".sp.json.elsewhere.{gone.pid}.old12345.tmp": (old, "removed"),
        ".sp.json.k3j_x9ab.tmp": (old, "removed"),  # a version that did not name the writer
        ".sp.json.k3j_x9cd.tmp": (None, "kept"),
        ".sp.json.lock": (old, "kept"),
        "sp.json.tmp": (old, "kept"),
        f".other.json.{host}.{gone.pid}.abcd1234.tmp": (old, "kept"),  # another file's: its own writes clean it
        ".sp.json.bak.k3j_x9ab.tmp": (old, "kept"),
    }
    for name, (mtime, _) in made.items():
        (tmp_path / name).write_text("x")
        if mtime is not None:
            os.utime(tmp_path / name, (mtime, mtime))
    files.atomic_write(str(tmp_path / "sp.json"), "new")
    expected = sorted(["sp.json"] + [name for name, (_, fate) in made.items() if fate == "kept"])
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
