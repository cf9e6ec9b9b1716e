"""Ctrl-C and SIGTERM during a run: a ``KeyboardInterrupt``, but never raised inside the study's storage.

Python raises ``KeyboardInterrupt`` at whatever line the main thread is on when the signal comes. Inside
the storage that line may sit in a database transaction: the interrupt unwinds past its commit or rollback,
and the lock stays held while the traceback keeps the session alive. Optuna then joins the trial's
heartbeat thread, whose next write waits on that lock for the storage's whole timeout (60 s on SQLite)
before the run can end. Raised while Optuna starts or stops that thread, it can also leave the thread
running, and a thread that is not a daemon keeps the process alive after the run has said it ended.

So a signal that finds the main thread in storage code is sent again :data:`RETRY_S` later, until it finds
the thread outside; that is a few milliseconds late at most, or once the storage call returns (each call
is bounded by the storage's timeouts).
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from types import FrameType

# Modules whose frames on the main thread's stack hold (or are about to take or give back) a database
# transaction or Optuna's heartbeat thread: the drivers, SQLAlchemy, Optuna's storages and its tell, ours.
STORAGE_MODULES = ("sqlite3", "psycopg2", "psycopg", "sqlalchemy", "alembic", "optuna.storages", "optuna.study._tell",
                   "optimize.study.storage")
RETRY_S = 0.02


def in_storage(frame: FrameType | None) -> bool:
    """Whether ``frame`` or one of its callers runs code of :data:`STORAGE_MODULES`."""
    while frame is not None:
        name = frame.f_globals.get("__name__") or ""
        if any(name == m or name.startswith(m + ".") for m in STORAGE_MODULES):
            return True
        frame = frame.f_back
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    if in_storage(frame):
        again = threading.Timer(RETRY_S, os.kill, (os.getpid(), signum))
        again.daemon = True  # never what keeps the process alive
        again.start()
        return
    # Once: a second signal while the first is being handled would cut the clean-up short.
    signal.signal(signum, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def interrupts_outside_storage(signals=(signal.SIGINT, signal.SIGTERM)):
    """Within the block, each of ``signals`` is a ``KeyboardInterrupt`` raised outside storage code (once:
    the signal is then ignored until the block ends); the handlers before it are restored on leaving it.
    The main thread only, as for any signal handler.

    >>> import os, signal
    >>> with interrupts_outside_storage():
    ...     try:
    ...         os.kill(os.getpid(), signal.SIGTERM)
    ...         for _ in range(10**6):  # the handler runs between two bytecodes of this loop
    ...             pass
    ...     except KeyboardInterrupt as e:
    ...         print(e.args[0] == f"signal {signal.SIGTERM}")
    True
    """
    previous = {s: signal.signal(s, _handler) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
