"""Crash-safe file writes: a crash or a full disk leaves the old file or the new one, never half of one.

Used for everything the package writes outside the database: ``search_params.json``, the HTML report,
generated images. The temporary file of a write is ``.NAME.HOST.PID.XXXXXXXX.tmp`` beside ``NAME``; one
left behind by a writer that was killed (``kill -9``, power loss) is removed by the next write of
``NAME``: once its writer's process is gone (same host), or it is older than :data:`STALE_AFTER`.

Example:
    >>> atomic_write("report.html", "<html>...</html>")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import stat
import tempfile
import time
from typing import Any

from .processes import pid_alive

STALE_AFTER = 15 * 60  # seconds: no write takes that long, so a temporary file this old is a dead writer's


def atomic_write(path: str, data) -> None:
    """Write to ``path`` so that a crash leaves the old file or the new one, never half of one
    (temporary file in the same directory, fsync, rename). ``data`` is text, bytes, or a function
    that writes to the open text file. A new file gets the usual permissions (0666 less the umask);
    an existing one keeps its own."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{_host()}.{os.getpid()}.", suffix=".tmp",
                                   dir=directory)
    except OSError as e:  # the message named the temporary file, which the user never asked for
        raise WriteError(e.errno, f"cannot write {path}: {e.strerror} (directory {os.path.dirname(path) or '.'})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") if callable(data) else os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError) and e.errno is not None:
            # "[Errno 28] No space left on device" named neither the file nor the disk
            reason = os_reason(e, path)
            raise WriteError(e.errno, f"cannot write {path}: {reason}", reason) from None
        raise


class WriteError(OSError):
    """A file that cannot be written, said in one line that names it (``str`` is the message alone;
    ``reason`` the cause without the file's name)."""

    def __init__(self, code: int, message: str, reason: str | None = None):
        super().__init__(code, message)
        self.reason = reason or message

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def os_reason(e: OSError, path: str) -> str:
    """The cause of a failed write of ``path`` in words; a full disk names the disk and its free space."""
    import errno

    reason = e.strerror or str(e)
    return f"{reason} ({disk_note(path)})" if e.errno == errno.ENOSPC else reason


def disk_note(path: str) -> str:
    """Which disk ``path`` is on (its mount point) and the space left on it."""
    import shutil

    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(directory):
        directory = os.path.dirname(directory)
    mount = directory
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return f"the disk mounted at {mount}"
    return f"the disk mounted at {mount} has {_size(free)} free"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 10 else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("not reached")


def read_only(path: str) -> bool:
    """Whether an existing file is read-only: not writable for this process, or without any write bit
    in its mode (root may write any file; a file made read-only means "do not replace me" to root too)."""
    try:
        return not os.access(path, os.W_OK) or not os.stat(path).st_mode & 0o222
    except OSError:
        return False


def writable_dir(directory: str) -> bool:
    """Whether files may be made in ``directory``: this process may, and its mode has a write bit (root
    may write anywhere; a folder made read-only means "do not write here" to root too)."""
    try:
        return os.access(directory, os.W_OK | os.X_OK) and bool(os.stat(directory).st_mode & 0o222)
    except OSError:
        return False


def check_output(path: str, option: str) -> None:
    """Refuse (:class:`WriteError`), before anything is computed, an output file that cannot be written:
    a read-only file, or a directory where this process cannot create files (the file's, or the nearest
    one that exists where it is still to be made). ``option`` names the option that chose ``path``."""
    import errno

    if os.path.exists(path) and read_only(path):
        raise WriteError(errno.EACCES, f"{path} is read-only: make it writable or pass another {option}")
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(directory):  # created on the first write
        directory = os.path.dirname(directory)
    if not os.path.isdir(directory):
        raise WriteError(errno.ENOTDIR, f"cannot write {path}: {directory} is not a directory")
    if not writable_dir(directory):
        raise WriteError(errno.EACCES, f"cannot write {path}: directory {directory} is not writable; pass another {option}")


@functools.lru_cache(maxsize=None)  # fixed for a process's life
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def remove_stale_temporaries(path: str) -> list[str]:
    """Remove the temporary files that writes of ``path`` left behind, as :mod:`optimize.study.files` names
    them (also those of versions that did not name the writer, by age alone); return what was removed.
    A live writer's file is kept; so is every other file."""
    directory = os.path.dirname(os.path.abspath(path))
    ours = re.compile(rf"\.{re.escape(os.path.basename(path))}\.(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.)?"
                      r"[A-Za-z0-9_]+\.tmp")
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = ours.fullmatch(name)
        if m is None:
            continue
        tmp = os.path.join(directory, name)
        try:
            st = os.lstat(tmp)
            dead = m["pid"] is not None and m["host"] == _host() and not pid_alive(int(m["pid"]))
            if stat.S_ISREG(st.st_mode) and (dead or time.time() - st.st_mtime > STALE_AFTER):
                os.unlink(tmp)
                removed.append(tmp)
        except OSError:  # gone meanwhile (its writer finished, or another cleaner was first), or not ours to remove
            continue
    return removed


def atomic_write_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` with :func:`atomic_write`."""

    def write(f) -> None:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")

    atomic_write(path, write)
