"""Where results live: the Optuna storage of studies, and ``search_params.json``.

Studies go to an RDB storage (default ``sqlite:///studies/optimize-sd.db``) with a heartbeat, so a
trial whose process died is marked failed and re-queued when the study next runs.
``search_params.json`` maps one key per (model, scheduler, steps, mode, bound) to the best feasible
configuration; it is rewritten atomically under a lock and other keys are kept.

Example:
    >>> update_search_params("search_params.json", "tiny:ddim:20:max:0.02", {"params": {}})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from typing import Any

DEFAULT_STORAGE = "sqlite:///studies/optimize-sd.db"
SCHEMES = ("sqlite", "postgresql", "mysql")


class StorageError(ValueError):
    pass


def check_storage_url(url: str) -> None:
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if "://" not in url or scheme not in SCHEMES:
        raise StorageError(f"unsupported storage {url!r}: use sqlite:///PATH, postgresql://... or mysql://...")


def open_storage(url: str, heartbeat_interval: int = 60, grace_period: int | None = None):
    """An RDB storage with heartbeat and retry of trials whose worker died."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    check_storage_url(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
            grace_period=grace_period or 2 * heartbeat_interval,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
        )
    except Exception as e:  # noqa: BLE001 - unreachable server, corrupt file: one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"cannot open storage {url}: {first}") from e


def atomic_write_json(path: str, data: Any) -> None:
    """Write JSON to ``path`` so that a crash leaves either the old or the new file, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".search_params.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_search_params(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise StorageError(f"{path} is not valid JSON ({e}); fix or move it, it is not overwritten") from None
    if not isinstance(data, dict):
        raise StorageError(f"{path} does not hold a JSON object; fix or move it, it is not overwritten")
    return data


def update_search_params(path: str, key: str, entry: dict[str, Any]) -> None:
    """Set ``key`` in the JSON file at ``path``, keeping every other key (locked, atomic)."""
    lock_path = os.path.join(os.path.dirname(os.path.abspath(path)), "." + os.path.basename(path) + ".lock")
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read_search_params(path)
        data[key] = entry
        atomic_write_json(path, data)
