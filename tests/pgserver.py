"""A PostgreSQL server for the tests.

``OPTIMIZE_SD_TEST_POSTGRES``, if set, names a running server, e.g.
``postgresql://postgres@127.0.0.1:54329/postgres``; its role must be allowed to create databases.
Without it, a throwaway server is started on loopback from the Debian package's binaries
(``/usr/lib/postgresql/*/bin``, as the ``postgres`` user when running as root) and stopped at exit.

Tests skip only where neither works; under CI (``CI`` set, as ``.ci/run`` does) they fail instead.
Every test gets a database of its own (:func:`fresh_database`).
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid

ENV = "OPTIMIZE_SD_TEST_POSTGRES"
_STATE: dict = {}


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _start_throwaway() -> str:
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not (initdb and pg_ctl):
        raise RuntimeError("no PostgreSQL server binaries (apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and there is no 'postgres' user to run the server") from None
    directory = tempfile.mkdtemp(prefix="optimize-sd-pg-")
    data = os.path.join(directory, "data")
    if os.geteuid() == 0:
        os.chown(directory, user.pw_uid, user.pw_gid)
    port = _free_port()
    run = dict(check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    try:
        subprocess.run(_as_server_user([initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"]), **run)
        subprocess.run(_as_server_user([
            pg_ctl, "-D", data, "-l", os.path.join(directory, "log"), "-w", "-t", "60", "start", "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {directory} -c fsync=off -c max_connections=200",
        ]), **run)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        output = getattr(e, "output", b"") or b""
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"could not start a PostgreSQL server: {e} {output.decode(errors='replace')[-500:]}") from None

    def stop():
        subprocess.run(_as_server_user([pg_ctl, "-D", data, "-m", "immediate", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)

    atexit.register(stop)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def _connect(url: str):
    import psycopg2

    con = psycopg2.connect(url, connect_timeout=10)
    con.autocommit = True
    return con


def server_url() -> str:
    """The base URL of a running server; raises RuntimeError saying why there is none."""
    if "url" in _STATE:
        return _STATE["url"]
    if "error" in _STATE:
        raise RuntimeError(_STATE["error"])
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _STATE["error"] = "psycopg2 is not installed (pip install psycopg2-binary)"
        raise RuntimeError(_STATE["error"]) from None
    try:
        url = os.environ.get(ENV) or _start_throwaway()
        _connect(url).close()
    except Exception as e:  # noqa: BLE001 - any reason is a reason to skip (or fail under CI)
        _STATE["error"] = f"no PostgreSQL server: {e}"
        raise RuntimeError(_STATE["error"]) from None
    _STATE["url"] = url
    return url


def require_server() -> str:
    """``server_url()`` for a test: skip where no server can be had, fail under CI or when one was named."""
    import pytest

    try:
        return server_url()
    except RuntimeError as e:
        if os.environ.get("CI") or os.environ.get(ENV):
            pytest.fail(f"{e} (CI must have one: see .ci/run)")
        pytest.skip(str(e))


def fresh_database(base_url: str) -> str:
    """Create an empty database on the server of ``base_url``; return its URL."""
    from sqlalchemy.engine import make_url

    name = "t_" + uuid.uuid4().hex[:12]
    con = _connect(base_url)
    try:
        con.cursor().execute(f"CREATE DATABASE {name}")
    finally:
        con.close()
    if not _STATE.get("databases"):
        _STATE["databases"] = []
        atexit.register(_drop_databases, base_url)
    _STATE["databases"].append(name)
    return make_url(base_url).set(database=name).render_as_string(hide_password=False)


def _drop_databases(base_url: str) -> None:
    """Leave a named server as it was found (a throwaway one goes whole)."""
    try:
        con = _connect(base_url)
    except Exception:  # noqa: BLE001 - server already gone
        return
    try:
        for name in _STATE.get("databases", []):
            try:
                con.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            except Exception:  # noqa: BLE001 - best effort
                pass
    finally:
        con.close()
