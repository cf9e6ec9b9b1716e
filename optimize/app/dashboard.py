"""``optimize-sd dashboard``: optuna-dashboard on a study storage, with the trials' images, read-only.

The database is opened read-only, and the dashboard's own writes (delete or upload an image, notes,
create, rename or delete a study, tell a trial, migrate the schema) are refused here with 403 before
they reach it: its trash button removed a baseline image's file first and only then failed on the
read-only database, so the study named an image that was gone. An image missing from the artifact
directory (a study run on another machine) is a plain 404, not a server error with a traceback.

Example:
    >>> serve("sqlite:///studies/optimize-sd.db", None, "127.0.0.1", 8080, print)  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from typing import Callable

from ..study.artifacts import artifact_dir_for, artifact_store
from ..study.storage import open_storage, redact

READ_ONLY = "optimize-sd dashboard is read-only: the study and its images are not changed from here"
_ARTIFACT = re.compile(r"/artifacts/\d+(?:/\d+)?/([0-9a-fA-F-]+)/?")


class DashboardError(Exception):
    """The server cannot start (the port is taken, the host cannot be bound); one line."""


def read_only_app(app, directory: str):
    """``app`` (a WSGI application) answering every request but GET and HEAD with 403, and a request for
    an image that is not in ``directory`` with 404."""

    def guarded(environ, start_response):
        if environ.get("REQUEST_METHOD", "GET").upper() not in ("GET", "HEAD"):
            return _answer(start_response, "403 Forbidden", READ_ONLY)
        m = _ARTIFACT.fullmatch(environ.get("PATH_INFO", ""))
        if m and not os.path.isfile(os.path.join(directory, m.group(1))):
            return _answer(start_response, "404 Not Found", f"image {m.group(1)} is not in {directory}")
        return app(environ, start_response)

    return guarded


def _answer(start_response, status: str, reason: str) -> list[bytes]:
    body = json.dumps({"reason": reason}).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def serve(storage_url: str, artifact_dir: str | None, host: str, port: int, echo: Callable[[str], None]) -> None:
    """Serve the dashboard until Ctrl-C. ``StorageError`` for a storage that cannot be read,
    :class:`DashboardError` for an address that cannot be served on; both before the first line."""
    from wsgiref.simple_server import make_server

    import optuna_dashboard

    storage = open_storage(storage_url, read_only=True)
    directory = artifact_dir_for(storage_url, artifact_dir)
    app = optuna_dashboard.wsgi(storage, artifact_store=artifact_store(directory, create=False))
    try:
        server = make_server(host, port, read_only_app(app, directory))
    except OSError as e:  # bound before the line that names the address, so that line is never wrong
        hint = f"; another program uses port {port}: pass another --port" if e.errno == errno.EADDRINUSE else ""
        raise DashboardError(f"cannot serve on {host}:{port}: {e.strerror or e}{hint}") from None
    with server:
        echo(f"optuna-dashboard on http://{host}:{server.server_port} ({redact(storage_url)}, images in {directory}); "
             "Ctrl-C to stop")
        if not os.path.isdir(directory):
            echo(f"note: no image directory {directory}: the trials are shown without images (--artifact-dir)")
        # served from a thread so that Ctrl-C lands here, never inside a request: wsgiref takes a
        # KeyboardInterrupt raised in a request for that request's error, logs a traceback and serves on
        serving = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
        serving.start()
        try:
            while serving.is_alive():
                serving.join(0.5)
        except KeyboardInterrupt:  # how a server is meant to stop
            server.shutdown()
            echo("dashboard stopped")
