"""Which process runs a trial, and whether it is gone: so that a run started again on the same machine
retries a killed run's trial at once instead of waiting for its heartbeat to go stale.

A process is recorded as its host name (for people), the *machine* it runs on (what makes two pids
comparable: this boot of this kernel and this pid namespace, on Linux; the host name elsewhere), its
pid and its start time. A recorded process is *gone* only when that is certain: it ran on this
machine and no process has its pid any more, or the process with its pid is a zombie or started at
another time (the pid was reused). On a system without ``/proc`` a reused pid looks alive: the trial
then waits for its heartbeat, as a trial of another machine always does.

Example:
    >>> is_gone(identity())
    False
"""

from __future__ import annotations

import functools
import os
import socket
from typing import Any


def identity() -> dict[str, Any]:
    """This process, as a trial records it."""
    pid = os.getpid()
    stat = _stat(pid)
    return {"host": socket.gethostname(), "machine": machine(), "pid": pid, "start": stat[1] if stat else None}


@functools.lru_cache(maxsize=None)  # fixed for a process's life
def machine() -> str:
    """What pids are comparable within: the kernel's boot id and this pid namespace (two containers on
    one host have their own), or the host name where those cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks after boot)`` of a process, from /proc; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        pass
    return True


def is_gone(owner: Any) -> bool:
    """Whether the process ``owner`` (an :func:`identity`) has surely ended. False when it cannot be
    told here: another machine, or nothing usable recorded."""
    if not isinstance(owner, dict) or owner.get("machine") != machine():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:  # kill(0 or less) would signal a group
        return False
    if not pid_alive(pid):
        return True
    stat = _stat(pid)  # a process (maybe another user's) has the pid: compare start times
    if stat is None:
        return False
    state, start = stat
    return state in ("Z", "X") or (owner.get("start") is not None and start != owner["start"])
