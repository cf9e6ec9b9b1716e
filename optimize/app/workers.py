"""Several workers on one study: ``optimize-sd run --gpus 0,1,2,3`` or ``--workers N``.

The launcher does the cheap, shared part once — checks the options, opens the storage, creates the
study (or checks the stored one against this command) — then starts one ``optimize-sd run`` process
per device and waits for them:

* worker *i* runs on its own device (``--gpus``: ``cuda:<index>``; ``--workers N``: N processes on
  ``--device``), with ``--n-trials`` split evenly between the workers (the first ones get the
  remainder), so the command adds exactly ``--n-trials`` trials to the study;
* each worker's sampler seed is derived from ``--seed``, the trial count and a slot the database hands
  to every process that opens the study (:func:`optimize.app.runner.sampler_slot`), so no two workers, nor
  two commands started together, propose the same start-up configurations (TPE's constant liar keeps
  them apart later);
* the baseline is measured by whichever workers find none stored; the first one stored is kept (see
  :func:`optimize.app.runner.ensure_baseline`), and every worker times the baseline on its own device;
* worker output comes back line by line, prefixed ``[w<i> <device>]``;
* Ctrl-C or SIGTERM is forwarded to every worker (each marks its running trial failed and exits, with
  one line; one still importing says ``optimize-sd: interrupted``); a second one kills them;
* a worker that is killed (or crashes) leaves its trial running: the next trial another worker starts
  fails it and queues it again, and once all workers are done the launcher does so for any left, so
  the study holds no trial of a dead process as running (it is re-run when the study next runs).
  The workers run in their own process group, so a terminal's Ctrl-C reaches them once, through
  the launcher, and they receive SIGTERM if the launcher itself dies.

Workers on several machines join the same study by running the same command against one
``--storage postgresql://...``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Callable

from optuna.trial import TrialState

from . import console
from ..study.baseline import Baseline
from ..measure.prompts import counted
from .runner import RunOptions, prepare_study
from ..study.storage import MAX_RETRY, redact, storage_errors
from ..study.record import OWNER, study_result

LAUNCHER_ENV = "OPTIMIZE_SD_LAUNCHER_PID"


def split_trials(n_trials: int, n_workers: int) -> list[int]:
    """``n_trials`` split between ``n_workers`` as evenly as possible, larger shares first.

    >>> split_trials(7, 3)
    [3, 2, 2]
    """
    return [n_trials // n_workers + (i < n_trials % n_workers) for i in range(n_workers)]


def follow_launcher() -> None:
    """Called first thing in a worker: get SIGTERM (handled like Ctrl-C) when the launcher dies (Linux)."""
    parent = os.environ.get(LAUNCHER_ENV)
    if not parent:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: a worker then outlives a killed launcher
        return
    if os.getppid() != int(parent):  # the launcher died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Worker:
    def __init__(self, index: int, device: str, n_trials: int, argv: list[str], echo: console.Echo):
        self.index, self.device, self.n_trials, self.echo = index, device, n_trials, echo
        self.label = f"w{index} {device}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{LAUNCHER_ENV: str(os.getpid())})
        # the workers run this very package, whatever is installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "optimize.cli", *argv], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, process_group=0,
        )
        self.readers = [self._relay(self.proc.stdout, False), self._relay(self.proc.stderr, True)]
        self.reported = False

    def _relay(self, stream, err: bool) -> threading.Thread:
        def pump():
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if not line.strip():  # click's blank line after Ctrl-C ends a terminal's "^C", not a line here
                    continue
                with _ECHO_LOCK:
                    self.echo(f"[{self.label}] {line}", err=err)
            stream.close()

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        return thread

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def describe_exit(self) -> str | None:
        """How the worker ended, in one line; None after Ctrl-C, which the worker's own line tells."""
        code = self.proc.returncode
        if code == 0:
            return f"worker {self.label} finished its {counted(self.n_trials, 'trial')}"
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            return (f"worker {self.label} was killed ({name}); its running trial is retried by the next trial a worker "
                    f"starts (on another machine: once its heartbeat is stale), or when the study next runs")
        if code == 130:
            return None
        return f"worker {self.label} failed (exit {code})"


_ECHO_LOCK = threading.Lock()


def launch(spec, opts: RunOptions, worker_argv: Callable[[str, int, int], list[str]],
           echo: console.Echo = console.echo) -> int:
    """Run ``opts.n_trials`` trials with one worker process per ``opts.devices``; return the exit code.

    ``worker_argv(device, n_trials, index)`` gives a worker's ``optimize-sd`` arguments; every line for
    the user, the workers' included, goes to ``echo(line, err=False)``.
    """
    _, storage, _, study, n_before = prepare_study(spec, opts, echo)  # created once here, before any worker starts
    devices = list(opts.devices)
    shares = [n for n in split_trials(opts.n_trials, len(devices)) if n > 0]
    devices = devices[: len(shares)]
    echo(f"study {study.study_name} ({redact(opts.storage)}): {counted(n_before, 'trial')} so far, adding {opts.n_trials} "
         f"with {len(devices)} workers on {', '.join(devices)}")
    if len(shares) < len(opts.devices):
        echo(f"note: --n-trials {opts.n_trials} is fewer than the {len(opts.devices)} devices: "
             f"{len(devices)} workers started")
    workers, interrupted = _run_workers(devices, shares, worker_argv, echo)
    _fail_killed_workers_trials(storage, study, workers, echo)
    return _summary(study, opts, n_before, workers, interrupted, echo)


def _fail_killed_workers_trials(storage, study, workers: list[_Worker], echo) -> None:
    """The trial a killed worker left running, when no other worker started a trial after it died (which
    would have retried it): failed and queued again now, not left RUNNING in the study until it runs."""
    labels = {w.proc.pid: w.label for w in workers}
    try:
        failed = storage.fail_dead_trials(study)
    except storage_errors():  # the storage went away too: the next run does this
        return
    for trial, queued in failed:
        pid = trial.system_attrs[OWNER]["pid"]
        who = f"worker {labels[pid]}" if pid in labels else f"pid {pid}"
        fate = "queued again: it runs when the study next runs" if queued else \
            f"not queued again: retried {MAX_RETRY} times already"
        echo(f"trial #{trial.number} of {who}, which is gone, marked failed and {fate}", err=True)


def _run_workers(devices: list[str], shares: list[int], worker_argv, echo) -> tuple[list[_Worker], bool]:
    """Start the workers, relay their output and the signals this process gets, wait for them all;
    ``(workers, interrupted)``."""
    workers: list[_Worker] = []
    received: list[int] = []  # signals, in order; the loop below forwards them

    def record(signum, frame):
        received.append(signum)

    def forward(already: int) -> int:
        for signum in received[already:]:
            if already == 0:
                with _ECHO_LOCK:
                    echo(f"{signal.Signals(signum).name}: stopping {len(workers)} workers (each marks its running "
                         "trial failed; send it again to kill them)", err=True)
                for w in workers:
                    w.signal(signal.SIGINT)
            else:
                for w in workers:
                    w.signal(signal.SIGKILL)
            already += 1
        return already

    previous = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    forwarded = 0
    try:
        for index, (device, n) in enumerate(zip(devices, shares)):
            if received:
                break
            workers.append(_Worker(index, device, n, worker_argv(device, n, index), echo))
        while True:
            forwarded = forward(forwarded)
            if not any([_report_exit(w, echo) for w in workers]):  # a list: every exited worker is reported
                break
            time.sleep(0.2)
    finally:
        _stop(workers)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return workers, bool(received)


def _report_exit(w: _Worker, echo) -> bool:
    """Whether ``w`` still runs; once it has exited, its last lines and how it ended are echoed once."""
    if w.proc.poll() is None:
        return True
    if not w.reported:
        w.reported = True
        for t in w.readers:
            t.join(timeout=10)
        line = w.describe_exit()
        if line is not None:
            with _ECHO_LOCK:
                echo(line, err=w.proc.returncode != 0)
    return False


def _stop(workers: list[_Worker]) -> None:
    """Only has live workers to stop if the launcher itself failed."""
    for w in workers:
        if w.proc.poll() is None:
            w.signal(signal.SIGTERM)
    for w in workers:
        try:
            w.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            w.signal(signal.SIGKILL)
            w.proc.wait()


def _summary(study, opts: RunOptions, n_before: int, workers: list[_Worker], interrupted: bool, echo) -> int:
    trials = study.get_trials(deepcopy=False)
    added = Counter(t.state.name.lower() for t in trials[n_before:])
    echo(f"study {study.study_name}: {counted(len(trials), 'trial')} ({len(trials) - n_before} added: "
         + ", ".join(f"{n} {state}" for state, n in sorted(added.items())) + ")")
    baseline = Baseline.load(study)
    if baseline is not None:
        echo(console.format_result(study.study_name, opts.goal, *study_result(study, opts.goal), baseline))
    codes = [w.proc.returncode for w in workers]
    if interrupted:
        done = sum(1 for t in trials if t.state == TrialState.COMPLETE)
        echo(f"interrupted: {counted(done, 'completed trial')} kept, running ones marked failed; run the same command to resume",
             err=True)
        return 130
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    return next((c for c in failed if c > 0), 1)
