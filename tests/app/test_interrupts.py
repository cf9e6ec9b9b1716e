"""Ctrl-C and SIGTERM during a run are raised outside the storage's code (optimize.app.interrupts)."""

import os
import signal
import sys
import time
import types

import pytest

from optimize.app.interrupts import in_storage, interrupts_outside_storage

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

PROBE = """
import os, time

def work(signum, seconds):
    # a signal to this process from inside "storage code", then this frame stays on the stack a while
    os.kill(os.getpid(), signum)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return True
"""


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(PROBE, f"<{name}>", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_storage_code_is_raised_once_that_code_returns(signum):
    storage = _module("optuna.storages._probe")
    with interrupts_outside_storage():
        finished = False
        with pytest.raises(KeyboardInterrupt):
            finished = storage.work(signum, 0.3)  # an interrupt here would leave a transaction or thread open
            end = time.monotonic() + 5
            while time.monotonic() < end:
                pass
        assert finished
        # once: the same signal again is ignored until the block ends
        os.kill(os.getpid(), signum)
        time.sleep(0.1)
    assert signal.getsignal(signum) is not None and signal.getsignal(signum) != signal.SIG_IGN


def test_a_signal_elsewhere_is_raised_where_it_finds_the_thread():
    other = _module("optimize.measure._probe")  # a model call, say: no reason to wait
    with interrupts_outside_storage():
        with pytest.raises(KeyboardInterrupt):
            other.work(signal.SIGTERM, 5)
            pytest.fail("the loop ran to its end")


def test_storage_frames_are_told_by_their_module():
    seen = {}

    def capture():
        seen["frame"] = sys._getframe()

    for name, inside in [("sqlalchemy.orm.session", True), ("optuna.storages._rdb.storage", True),
                         ("optuna.study._tell", True), ("optuna.study._optimize", False),
                         ("sqlalchemy_utils", False), ("optimize.study.storage", True), ("optimize.study.record", False)]:
        module = types.ModuleType(name)
        module.capture = capture
        exec("def call():\n    capture()\n", module.__dict__)
        module.call()
        assert in_storage(seen["frame"]) is inside, name


def test_the_handlers_before_the_block_are_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt):
        with interrupts_outside_storage():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert {s: signal.getsignal(s) for s in before} == before
