"""Crash-safe file writes: a crash or a full disk leaves the old file or the new one, never half of one.

Used for everything the package writes outside the database: ``search_params.json``, the HTML report,
generated images.

Example:
    >>> atomic_write("report.html", "<html>...</html>")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any


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
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
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
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` with :func:`atomic_write`."""

    def write(f) -> None:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")

    atomic_write(path, write)
