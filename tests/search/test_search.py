"""The search end to end on the tiny pipeline: both goals, resume, failed trials, optuna-dashboard's
view of the constraints, and a killed worker whose trial is retried.

Settings are the smallest that exercise every method (``--steps 8 --num-samples 2``): about a second
a trial on a CPU. The two 4-trial runs (target and max mode) are shared with tests/app/test_cli.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
from optuna.trial import TrialState

try:
    from helpers import (DEFAULT_TIMING, SMALL, goal_opts, load_study, max_run, pareto_run, run_args, run_cli, sqlite_rows,
                         storage_url, target_run)
except ImportError:  # tests/ made a package
    from tests.helpers import (DEFAULT_TIMING, SMALL, goal_opts, load_study, max_run, pareto_run, run_args, run_cli,
                               sqlite_rows, storage_url, target_run)

from optimize.app import runner
from optimize.levers import METHODS, Context
from optimize.levers.base import Device
from optimize.study.record import CONSTRAINTS_ATTR, Goal, best_feasible, is_feasible

ATTRS = ("speedup", "score_loss", "time_per_image", "spread", "clip_score", "config")


# --- 1. both goals ------------------------------------------------------------------------------------


def _check_study(run, goal: Goal, direction: str, n_constraints: int, name: str):
    assert run.code == 0, run.out + run.err
    assert runner.study_name_for(*goal_opts(target=goal.target_speedup, max_loss=goal.max_loss)) == name
    assert run.study_name == name and f"study {name} ({run.storage}): 0 trials so far, adding 4" in run.out
    url = run.storage
    assert run.study_name in optuna.get_all_study_names(optuna.storages.RDBStorage(url))
    study = run.study()
    assert study.direction.name.lower() == direction
    trials = study.trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials), [(t.number, t.state, t.user_attrs) for t in trials]

    base = study.user_attrs["baseline"]
    assert base["time_per_image"] > 0 and base["clip_score"] > 0
    meta = study.user_attrs["optimize_sd"]
    assert meta["goal"] == goal.as_dict()
    assert len(meta["constraints"]) == n_constraints

    for t in trials:
        for key in ATTRS:
            assert key in t.user_attrs, (t.number, key)
        a = t.user_attrs
        assert a["speedup"] > 0 and a["time_per_image"] > 0 and math.isfinite(a["score_loss"])
        # speedup is the baseline time (the stored one, or the one re-timed in this run) over this trial's
        assert a["speedup"] == pytest.approx(a.get("baseline_time", base["time_per_image"]) / a["time_per_image"],
                                             rel=1e-9)
        cons = t.system_attrs[CONSTRAINTS_ATTR]
        assert isinstance(cons, list) and len(cons) == n_constraints
        assert cons == pytest.approx(goal.constraints(a["speedup"], a["score_loss"]))
        expect_feasible = a["score_loss"] <= goal.max_loss and (
            goal.mode == "max" or a["speedup"] >= goal.target_speedup)
        assert is_feasible(t) == expect_feasible == all(c <= 0 for c in cons)
        assert t.value == pytest.approx(a["score_loss"] if goal.mode == "target" else a["speedup"])
    # one line per trial, then the summary
    for t in trials:
        assert f"#{t.number:<3d}" in run.out
    return study


def test_target_mode(target):
    goal = Goal("target", 1.2, 0.02)
    study = _check_study(target, goal, "minimize", 2, "tiny-ddim-8steps-target1.2-loss0.02")
    assert study.metric_names == ["score_loss"]
    best = best_feasible(study, goal)
    if best is None:
        assert "no feasible trial yet" in target.out
    else:
        feasible = [t for t in study.trials if is_feasible(t)]
        assert best.user_attrs["score_loss"] == min(t.user_attrs["score_loss"] for t in feasible)
        assert f"best feasible trial #{best.number}" in target.out


def test_max_mode(maxrun):
    goal = Goal("max", None, 0.05)
    study = _check_study(maxrun, goal, "maximize", 1, "tiny-ddim-8steps-max-loss0.05")
    assert study.metric_names == ["speedup"]
    best = best_feasible(study, goal)
    assert best is not None, maxrun.out  # losses of the tiny model are far below 0.05
    feasible = [t for t in study.trials if is_feasible(t)]
    assert best.user_attrs["speedup"] == max(t.user_attrs["speedup"] for t in feasible)
    assert f"best feasible trial #{best.number}" in maxrun.out


def test_search_space_respects_methods_and_steps():
    """--methods limits what may switch on; with <= 4 steps T-GATE is never suggested."""
    from optimize.search import SearchSpace

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = SearchSpace(("deepcache", "tome"), Context(steps=8, max_branch_id=3))
    for _ in range(20):
        trial = study.ask()
        config = space.suggest(trial)
        assert "tgate" not in trial.params and config.tgate is None
        if config.deepcache is not None:
            assert 2 <= config.deepcache.cache_interval <= 10 and 0 <= config.deepcache.cache_branch_id <= 3
        study.tell(trial, 1.0)
    space = SearchSpace(("tgate",), Context(steps=4, max_branch_id=3))
    trial = study.ask()
    assert space.suggest(trial).tgate is None and trial.params == {}
    space = SearchSpace(("tgate",), Context(steps=8, max_branch_id=3))
    for _ in range(20):
        trial = study.ask()
        c = space.suggest(trial)
        if c.tgate is not None:
            assert 4 <= trial.params["tgate.gate_step"] <= 7
        study.tell(trial, 1.0)


@pytest.fixture
def gpu_levers_here(monkeypatch):
    """The precision and compile levers available whatever this machine has: torchao and Triton are
    taken as installed (the context's device is a made-up Hopper GPU)."""
    from optimize.levers import BY_NAME
    from optimize.levers import precision as precision_module

    monkeypatch.setattr(precision_module, "torchao_missing", lambda: None)
    monkeypatch.setattr(BY_NAME["compile"], "unavailable",
                        lambda ctx: None if ctx.device is None or ctx.device.type == "cuda" else "needs a CUDA device")
    return Context(steps=8, max_branch_id=3, scheduler="ddim", device=Device("cuda", (9, 0)))


def test_precision_is_drawn_only_in_trials_that_compile(gpu_levers_here):
    """precision requires compile: a trial draws it (its switch and its mode) only once compile is on,
    so no configuration quantizes an uncompiled UNet; where compile is on, both ways are drawn."""
    from optimize.levers import BY_NAME
    from optimize.search import SearchSpace

    assert BY_NAME["precision"].unavailable(gpu_levers_here) is None  # so the search may draw it
    assert BY_NAME["compile"].unavailable(gpu_levers_here) is None
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = SearchSpace(("deepcache", "tome", "precision", "compile"), gpu_levers_here)
    compiled, precision_on, modes = 0, 0, set()
    for _ in range(80):
        trial = study.ask()
        config = space.suggest(trial)
        if config.precision is not None:
            assert config.compile is not None, trial.params
            precision_on += 1
            modes.add(config.precision.mode)
        if config.compile is None:
            assert trial.params["compile"] is False
            assert not any(k == "precision" or k.startswith("precision.") for k in trial.params), trial.params
        else:
            compiled += 1
            assert "precision" in trial.params  # drawn after compile, in every trial that compiles
            assert trial.params["precision"] == (config.precision is not None)
        study.tell(trial, 1.0)
    assert 0 < precision_on < compiled < 80  # both ways, so the checks above could fail
    assert modes == {"int8", "fp8"}  # fp8 runs on capability 9.0
    # without compile among the methods precision is never drawn
    space = SearchSpace(("deepcache", "precision"), gpu_levers_here)
    for _ in range(20):
        trial = study.ask()
        assert space.suggest(trial).precision is None
        assert "precision" not in trial.params, trial.params
        study.tell(trial, 1.0)


def test_precision_is_drawn_after_every_other_lever():
    from optimize.levers import LEVERS
    from optimize.search.space import suggestion_order

    order = [lever.name for lever in suggestion_order()]
    assert order[-1] == "precision" and order.index("compile") < order.index("precision")
    # the others keep the registry's order
    assert order[:-1] == [lever.name for lever in LEVERS if lever.name != "precision"]


def test_warm_starts_set_precision_only_beside_compile(gpu_levers_here):
    """A warm start fixes the switches its trial asks for: precision's only where compile is on (the
    compile warm start, precision off); the others' (compile off) have no precision key. Each is what
    the search space asks for: an enqueued warm start draws nothing more."""
    from optimize.search import SearchSpace, warm_start_params

    methods = ("deepcache", "tome", "precision", "compile")
    warm = warm_start_params(methods, gpu_levers_here)
    assert len(warm) == 3  # DeepCache N=3, N=5, the whole UNet compiled
    for entry in warm:
        assert ("precision" in entry) == (entry.get("compile") is True), entry
    assert warm[-1] == {"deepcache": False, "tome": False, "compile": True, "compile.mode": "default",
                        "precision": False}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = SearchSpace(methods, gpu_levers_here)
    for entry in warm:
        study.enqueue_trial(entry)
        trial = study.ask()
        space.suggest(trial)
        assert trial.params == entry
        study.tell(trial, 1.0)
    # without compile among the methods no warm start names precision
    assert all("precision" not in e for e in warm_start_params(("deepcache", "precision"), gpu_levers_here))


# --- 2. resume ----------------------------------------------------------------------------------------


def test_resume_reuses_baseline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = run_args(tmp_path, "--max-loss", "0.05")
    code, out1, err1 = run_cli(argv + ["--n-trials", "3"])
    assert code == 0, out1 + err1
    assert "measuring baseline" in out1
    assert "0 trials so far, adding 3" in out1
    study = load_study(storage_url(tmp_path))
    baseline = study.user_attrs["baseline"]
    meta = study.user_attrs["optimize_sd"]
    first_params = [t.params for t in study.trials]

    code, out2, err2 = run_cli(argv + ["--n-trials", "2"])
    assert code == 0, out2 + err2
    assert "measuring baseline" not in out2
    assert "reusing the stored baseline" in out2
    assert "3 trials so far, adding 2" in out2

    study = load_study(storage_url(tmp_path))
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert study.user_attrs["baseline"] == baseline  # identical dict, not re-measured
    assert study.user_attrs["optimize_sd"] == meta
    # the resumed run's sampler is seeded afresh: it does not replay the first run's start-up trials
    assert [t.params for t in study.trials[3:]] != first_params[:2]
    for t in study.trials[3:]:
        a = t.user_attrs
        assert a["speedup"] == pytest.approx(a.get("baseline_time", baseline["time_per_image"]) / a["time_per_image"])


# --- 4. a trial that raises ---------------------------------------------------------------------------


def test_failing_trial_is_recorded_and_search_goes_on(tmp_path, monkeypatch):
    from optimize.measure import evaluator as measure

    original = measure.Evaluator.measure
    calls = []

    def flaky(self, config, **kwargs):
        calls.append(config.label())
        if len(calls) == 3:  # call 1 is the baseline, 2 is trial #0, 3 is trial #1
            raise RuntimeError("boom")
        return original(self, config, **kwargs)

    monkeypatch.setattr(measure.Evaluator, "measure", flaky)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(run_args(tmp_path, "--max-loss", "0.05", "--n-trials", "3"))
    assert code == 0, out + err
    assert len(calls) == 4
    study = load_study(storage_url(tmp_path))
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    failed = study.trials[1]
    assert "boom" in failed.user_attrs["error"] and "RuntimeError" in failed.user_attrs["error"]
    assert CONSTRAINTS_ATTR not in failed.system_attrs
    assert "speedup" not in failed.user_attrs
    assert not is_feasible(failed)
    line = next(l for l in out.splitlines() if l.startswith("#1 "))
    assert "fail" in line and "boom" in line
    best = best_feasible(study, Goal("max", None, 0.05))
    assert best is not None and best.number != 1


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """A 2-trial run whose first trial measures a NaN CLIP score (call 1 is the baseline)."""
    from optimize.measure import evaluator as measure

    original = measure.Evaluator.measure
    calls = []

    def nan_scores(self, config, **kwargs):
        m = original(self, config, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            m.scores = m.scores * float("nan")
        return m

    directory = tmp_path_factory.mktemp("nan")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(measure.Evaluator, "measure", nan_scores)
        mp.chdir(directory)
        code, out, err = run_cli(run_args(directory, "--max-loss", "0.05", "--n-trials", "2"))
    return code, out, err, load_study(storage_url(directory))


def test_nan_measurement_fails_the_trial_not_the_study(nan_run):
    """A non-finite loss/speedup is a failed trial (never a feasible one, never a crash)."""
    code, out, err, study = nan_run
    assert code == 0, out + err
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert CONSTRAINTS_ATTR not in study.trials[0].system_attrs
    assert best_feasible(study, Goal("max", None, 0.05)).number == 1
    line = next(l for l in out.splitlines() if l.startswith("#0 "))
    assert "fail" in line


def test_nan_measurement_reason_is_recorded(nan_run):
    code, out, err, study = nan_run
    failed = study.trials[0]
    assert "score_loss" in failed.user_attrs.get("error", "") or "nan" in failed.user_attrs.get("error", "")
    assert "speedup" not in failed.user_attrs
    line = next(l for l in out.splitlines() if l.startswith("#0 "))
    assert line.split("fail:", 1)[1].strip()


# --- 8. optuna-dashboard reads the constraints ---------------------------------------------------------


def _dashboard_get(url: str, path: str) -> dict:
    import optuna_dashboard

    app = optuna_dashboard.wsgi(optuna.storages.RDBStorage(url))
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD="GET", PATH_INFO=path, QUERY_STRING="")
    status = {}

    def start_response(s, headers, exc_info=None):
        status["status"] = s

    body = b"".join(app(environ, start_response))
    assert status["status"].startswith("200"), (status, body[:500])
    return json.loads(body)


@pytest.mark.parametrize("which", ["target", "max", "pareto"])
def test_dashboard_sees_constraints(which, tmp_path_factory):
    run = {"target": target_run, "max": max_run, "pareto": pareto_run}[which](tmp_path_factory)
    assert run.code == 0, run.out + run.err
    study = run.study()
    data = _dashboard_get(run.storage, f"/api/studies/{study._study_id}")
    assert data["name"] == run.study_name
    assert data["objective_names"] == {"target": ["score_loss"], "max": ["speedup"],
                                       "pareto": ["speedup", "ssim_loss"]}[which]
    by_number = {t.number: t for t in study.trials}
    completed = [t for t in data["trials"] if t["state"] == "Complete"]
    assert len(completed) == len(by_number) == (6 if which == "pareto" else 4)
    for t in completed:
        stored = by_number[t["number"]].system_attrs[CONSTRAINTS_ATTR]
        assert t["constraints"], t  # an empty list would show every trial as feasible
        assert t["constraints"] == pytest.approx(stored)
        dashboard_feasible = all(c <= 0 for c in t["constraints"])
        assert dashboard_feasible == is_feasible(by_number[t["number"]])


# --- 9. a killed worker's trial is retried -------------------------------------------------------------

# A trial lasts a few seconds here, so the worker is surely mid-trial when it is killed.
SLOW = ["--pipe", "tiny", "--steps", "12", "--num-samples", "3", "--clip-model", "tiny-clip", "--no-progress",
        "--methods", "deepcache,tome,tgate", "--repeats", "1", "--scored-repeats", "2", "--no-speed-gate"]  # see helpers.SMALL


def _env() -> dict:
    """A subprocess's environment: one torch thread (as conftest sets for this process), no hub, and this
    checkout's package first on the path (not whichever copy is installed)."""
    threads = os.environ.get("OPTIMIZE_TEST_THREADS", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(runner.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    # PYTHONFAULTHANDLER: SIGABRT prints every thread's stack (_ended), so a run that hangs says where
    return dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_OFFLINE="1", PYTHONPATH=path,
                PYTHONFAULTHANDLER="1")


def _ended(proc, log_path, timeout: float) -> int:
    """``proc``'s exit status once it ends within ``timeout`` s; else its threads' stacks go to its log
    (SIGABRT, see _env) and the test fails with the log's end."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        pytest.fail(f"still running {timeout:g} s after the signal; its log ends:\n{log_path.read_text()[-6000:]}")


def _start_worker_until_running(tmp_path, argv):
    """Start ``optimize-sd run`` in a subprocess; return it and the number of its running trial
    (one after the baseline, with its config chosen)."""
    db = os.path.join(str(tmp_path), "s.db")
    log = open(tmp_path / "worker.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "optimize.cli", *argv, "--n-trials", "3"],
                            cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT, env=_env())
    log.close()
    running = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(db):
                try:
                    rows = sqlite_rows(db, """
                        SELECT t.number FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id
                        WHERE t.state = 'RUNNING' AND a.key = 'config'
                          AND EXISTS (SELECT 1 FROM study_user_attributes s
                                      WHERE s.study_id = t.study_id AND s.key = 'baseline')""")
                except Exception:  # noqa: BLE001 - tables not created yet, or locked for a moment
                    rows = []
                if rows:
                    running = rows[0][0]
                    break
            time.sleep(0.1)
        assert running is not None, f"no running trial seen (rc={proc.poll()}): {(tmp_path / 'worker.log').read_text()}"
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    return proc, running


@pytest.mark.timeout(400)
def test_terminated_worker_marks_its_trial_failed(tmp_path):
    """SIGTERM (a cluster's pre-emption) ends the run like Ctrl-C: exit 130, running trial FAIL."""
    argv = run_args(tmp_path, "--max-loss", "0.05", small=SLOW)
    proc, running = _start_worker_until_running(tmp_path, argv)
    proc.send_signal(signal.SIGTERM)
    assert _ended(proc, tmp_path / "worker.log", 60) == 130
    assert "interrupted" in (tmp_path / "worker.log").read_text()
    study = load_study(storage_url(tmp_path))
    assert study.trials[running].state == TrialState.FAIL


@pytest.mark.timeout(400)
def test_killed_trial_is_retried(tmp_path, monkeypatch):
    """kill -9, then the same command at once: the killed run's process is gone from this machine, so
    its trial is failed and re-queued at once (not after the 120 s heartbeat grace period), in one line."""
    # no warm start: its second enqueued trial would wait in the queue and shift the counts below
    argv = run_args(tmp_path, "--max-loss", "0.05", "--no-warm-start", small=SLOW)
    proc, running = _start_worker_until_running(tmp_path, argv)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    study = load_study(storage_url(tmp_path))
    killed = study.trials[running]
    assert killed.state == TrialState.RUNNING  # died mid-trial: nothing marked it
    n_before = len(study.trials)

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(argv + ["--n-trials", "2"])
    assert code == 0, out + err
    assert "reusing the stored baseline" in out
    lines = [line for line in out.splitlines() if "which is gone" in line]
    assert lines == [f"trial #{running} was left running by pid {proc.pid} on this machine, which is gone: "
                     "marked failed and queued again"], out
    study = load_study(storage_url(tmp_path))
    trials = study.trials
    assert trials[running].state == TrialState.FAIL
    assert len(trials) == n_before + 2
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == running]
    assert len(retries) == 1, [(t.number, t.state, t.system_attrs) for t in trials]
    retry = retries[0]
    assert retry.number > running
    assert retry.params == killed.params
    assert retry.system_attrs["retry_history"] == [running]
    assert retry.state == TrialState.COMPLETE
    assert "speedup" in retry.user_attrs and CONSTRAINTS_ATTR in retry.system_attrs
    assert retry.user_attrs["config"] == killed.user_attrs["config"]
    assert all(t.state == TrialState.COMPLETE for t in trials if t.number not in (running,))


@pytest.mark.timeout(400)
def test_terminated_while_measuring_the_baseline(tmp_path):
    """SIGTERM before the first trial (here: while the baseline is measured) ends the run as elsewhere:
    exit 130 and one line, nothing half-stored."""
    argv = run_args(tmp_path, "--max-loss", "0.05", "--n-trials", "1", small=[*SLOW[:SLOW.index("--num-samples") + 1], "8", *SLOW[SLOW.index("--num-samples") + 2:]])
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "optimize.cli", *argv], cwd=str(tmp_path), stdout=log,
                                stderr=subprocess.PIPE, env=_env(), text=True)
    try:
        deadline = time.monotonic() + 240
        while "measuring baseline" not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["interrupted while measuring the baseline: 0 completed trials kept; run the same command to "
                     "resume"], err
    study = load_study(storage_url(tmp_path))
    assert "baseline" not in study.user_attrs  # the signal came during the measurement
    assert {t.state for t in study.trials} == {TrialState.WAITING}  # the warm start, still to come


# A run that dies (SIGKILL, no handler runs) once the baseline is stored and its first image with it.
_DIES_STORING_IMAGES = """
import os, signal, sys
import optuna.artifacts
real, calls = optuna.artifacts.upload_artifact, []
def upload(**kwargs):
    calls.append(kwargs)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(**kwargs)
optuna.artifacts.upload_artifact = upload
from optimize.app.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow  # two processes killed, then a run
@pytest.mark.timeout(600)
def test_killed_while_the_baseline_is_measured_or_its_images_stored(tmp_path, monkeypatch):
    """kill -9 while the baseline is measured: nothing half-stored, the next run measures it. kill -9
    once the baseline is stored but only one of its images: the next run reuses the baseline, makes the
    images again and stores the missing one; it used to store none, so every later run generated them
    all again (a full baseline pass per run)."""
    from optimize.study.artifacts import artifact_dir_for, artifact_store, baseline_image_ids, load_baseline_images

    argv = run_args(tmp_path, "--max-loss", "0.5", "--n-trials", "1", "--images-per-trial", "0",
                    small=[*SMALL, "--num-samples", "6"])  # 6 prompts: time to kill it while it measures
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "optimize.cli", *argv], cwd=str(tmp_path), stdout=log,
                                stderr=subprocess.STDOUT, env=_env())
    try:
        deadline = time.monotonic() + 240
        while "measuring baseline" not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, log_path.read_text()
    study = load_study(storage_url(tmp_path))
    assert "baseline" not in study.user_attrs and {t.state for t in study.trials} == {TrialState.WAITING}

    died = subprocess.run([sys.executable, "-c", _DIES_STORING_IMAGES, *argv], cwd=str(tmp_path), env=_env(),
                          capture_output=True, text=True, timeout=400)
    assert died.returncode == -signal.SIGKILL and "measuring baseline" in died.stdout, died.stdout + died.stderr
    study = load_study(storage_url(tmp_path))
    assert "baseline" in study.user_attrs and list(baseline_image_ids(study)) == [0]

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(argv)
    assert code == 0, out + err
    assert "reusing the stored baseline" in out and "generating them again (6 prompts, same seeds)" in out
    study = load_study(storage_url(tmp_path))
    assert list(baseline_image_ids(study)) == list(range(6))
    # what decides whether the next run generates them again
    assert load_baseline_images(study, artifact_store(artifact_dir_for(storage_url(tmp_path))), 6) is not None
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.WAITING]


def test_interrupted_warm_start_trial_is_queued_again(tmp_path, monkeypatch):
    """Ctrl-C during a queued trial (warm start, or a retry): the configuration runs again when the
    study next runs, with the retry bookkeeping; one that is interrupted every time stops after the
    retry limit (2) instead of coming back for ever."""
    from optimize.measure import evaluator as measure
    from optimize.search import warm_start_params

    original = measure.Evaluator.measure

    def ctrl_c_on_dc3(self, config, **kwargs):  # Ctrl-C whenever DeepCache N=3 (the first warm start) runs
        if config.deepcache is not None and config.deepcache.cache_interval == 3:
            raise KeyboardInterrupt
        return original(self, config, **kwargs)

    monkeypatch.setattr(measure.Evaluator, "measure", ctrl_c_on_dc3)
    monkeypatch.chdir(tmp_path)
    argv = run_args(tmp_path, "--max-loss", "0.5")
    code, out, err = run_cli(argv + ["--n-trials", "1"])  # #0 DC3 interrupted, re-queued as #2 behind #1 DC5
    assert code == 130, out + err
    assert "interrupted: 0 completed trials kept, the running one marked failed and queued again; run the same " \
           "command to resume" in err
    code, out, err = run_cli(argv + ["--n-trials", "3"])  # #1 DC5 completes, #2 (DC3 again) interrupted
    assert code == 130 and "the running one marked failed and queued again" in err, out + err
    code, out, err = run_cli(argv + ["--n-trials", "1"])  # #3 (DC3, third time) interrupted: the limit
    assert code == 130, out + err
    assert "the running one marked failed (not queued again: retried 2 times already)" in err

    trials = load_study(storage_url(tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    dc3 = warm_start_params(("deepcache", "tome", "tgate"), Context(steps=8, scheduler="ddim"))[0]
    assert [trials[n].params for n in (0, 2, 3)] == [dc3] * 3
    assert [trials[n].system_attrs.get("retry_history") for n in (0, 2, 3)] == [None, [0], [0, 2]]
    assert trials[2].system_attrs["failed_trial"] == trials[3].system_attrs["failed_trial"] == 0


# --- warm start ----------------------------------------------------------------------------------------

def test_warm_start_params_follow_the_methods(monkeypatch):
    from optimize.search import warm_start_params

    ctx = Context(steps=20, scheduler="dpm++", device=Device("cpu"))  # where the compile lever does not run
    assert warm_start_params(("tome", "tgate"), ctx) == []
    first, second = warm_start_params(("deepcache", "tome", "tgate"), ctx)
    assert first == {"deepcache": True, "deepcache.cache_interval": 3, "deepcache.cache_branch_id": 0,
                     "tome": False, "tgate": False}
    assert second["deepcache.cache_interval"] == 5
    assert warm_start_params(("deepcache",), ctx)[0] == {"deepcache": True, "deepcache.cache_interval": 3,
                                                         "deepcache.cache_branch_id": 0}
    # the schedule: DPM++ at two fifths, then three fifths of the reference's steps, every other lever off
    bold, mild, *dc = warm_start_params(("schedule", "deepcache", "tome", "tgate"), ctx)
    assert bold == {"schedule": True, "schedule.solver": "dpm++", "schedule.steps": 8, "deepcache": False,
                    "tome": False, "tgate": False}
    assert mild == {**bold, "schedule.steps": 12}
    assert dc == [{"schedule": False, **d} for d in (first, second)]
    assert warm_start_params(("schedule",), Context(steps=50, scheduler="ddim")) == [
        {"schedule": True, "schedule.solver": "dpm++", "schedule.steps": n} for n in (20, 30)]
    # at 8 reference steps the schedule's 3 leave T-GATE (>= 5 steps) out of that trial, its 5 do not
    assert warm_start_params(("schedule", "tgate"), Context(steps=8, scheduler="ddim")) == [
        {"schedule": True, "schedule.solver": "dpm++", "schedule.steps": 3},
        {"schedule": True, "schedule.solver": "dpm++", "schedule.steps": 5, "tgate": False}]
    # never below the fewest steps the search draws (a fifth of the reference, at least 2); one trial where
    # both fractions round to the same steps
    assert warm_start_params(("schedule",), Context(steps=3, scheduler="ddim")) == [
        {"schedule": True, "schedule.solver": "dpm++", "schedule.steps": 2}]
    # where it runs, the whole UNet compiled alone; the others' switch it off
    monkeypatch.setattr(__import__("optimize.levers.compile", fromlist=["BACKEND"]), "BACKEND", "eager")
    assert warm_start_params(("deepcache", "compile"), ctx) == [
        {**{k: v for k, v in first.items() if k.startswith("deepcache")}, "compile": False},
        {**{k: v for k, v in second.items() if k.startswith("deepcache")}, "compile": False},
        {"deepcache": False, "compile": True, "compile.mode": "default"}]


def test_new_study_starts_with_known_good_configs_once(tmp_path, monkeypatch):
    from optimize.search import warm_start_params

    monkeypatch.chdir(tmp_path)
    here = [m for m in METHODS if m not in runner.unavailable_methods(METHODS, "cpu")]  # named ones must run here
    argv = run_args(tmp_path, "--max-loss", "0.5", "--methods", ",".join(here), "--n-trials", "4")
    code, out, err = run_cli(argv)
    assert code == 0, out + err
    study = load_study(storage_url(tmp_path))
    warm = warm_start_params(tuple(here), Context(steps=8, scheduler="ddim", device=Device("cpu")))
    # the schedule's two, DeepCache N=3, N=5; the VAE's switch, fixed off before the pipeline was known, is
    # never asked on this fp32 pipeline
    assert len(warm) == 4 and [t.params for t in study.trials] == [{k: v for k, v in w.items() if k != "vae"}
                                                                   for w in warm]
    code, out, err = run_cli(argv[:-1] + ["1"])  # resumed: nothing enqueued again
    assert code == 0, out + err
    study = load_study(storage_url(tmp_path))
    assert len(study.trials) == 5 and "fixed_params" not in study.trials[4].system_attrs


def test_no_warm_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(run_args(tmp_path, "--max-loss", "0.5", "--n-trials", "1", "--no-warm-start"))
    assert code == 0, out + err
    assert "fixed_params" not in load_study(storage_url(tmp_path)).trials[0].system_attrs


# --- images per trial, as optuna-dashboard shows them ---------------------------------------------------

def test_dashboard_shows_trial_and_baseline_images(tmp_path, monkeypatch):
    from optimize.study.artifacts import artifact_dir_for

    monkeypatch.chdir(tmp_path)
    argv = run_args(tmp_path, "--max-loss", "0.5", "--n-trials", "2", "--images-per-trial", "1")
    code, out, err = run_cli(argv)
    assert code == 0, out + err
    url = storage_url(tmp_path)
    study = load_study(url)
    data = _dashboard_get(url, f"/api/studies/{study._study_id}")
    # every baseline image is kept (trials are compared with them), however few per trial are
    assert sorted(a["filename"] for a in data["artifacts"]) == ["baseline-0.png", "baseline-1.png"]
    for t in data["trials"]:
        assert [a["filename"] for a in t["artifacts"]] == [f"trial{t['number']}-0.png"]
        assert all(a["mimetype"] == "image/png" for a in t["artifacts"])
    # the files behind them are real PNGs of the generated size, in the directory run chose
    directory = artifact_dir_for(url)
    files = os.listdir(directory)
    assert len(files) == 4
    from PIL import Image

    with Image.open(os.path.join(directory, data["trials"][0]["artifacts"][0]["artifact_id"])) as im:
        assert im.format == "PNG" and im.size == (64, 64)


def test_no_images_when_asked_for_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(run_args(tmp_path, "--max-loss", "0.5", "--n-trials", "1", "--images-per-trial", "0"))
    assert code == 0, out + err
    study = load_study(storage_url(tmp_path))
    data = _dashboard_get(storage_url(tmp_path), f"/api/studies/{study._study_id}")
    assert data["trials"][0]["artifacts"] == []
    # the baseline images are kept all the same: the trials' PSNR and SSIM compare with them
    assert sorted(a["filename"] for a in data["artifacts"]) == ["baseline-0.png", "baseline-1.png"]
    assert {"psnr", "ssim"} <= set(study.trials[0].user_attrs)


# --- speed gate ----------------------------------------------------------------------------------------

def test_speed_gate_skips_scoring_of_configs_too_slow_for_the_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = run_args(tmp_path, "--target-speedup", "50", "--repeats", "1", "--speed-gate", "--n-trials", "3")
    code, out, err = run_cli(argv)
    assert code == 0, out + err
    trials = load_study(storage_url(tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3
    for t in trials:
        assert "clip_score" not in t.user_attrs and t.user_attrs["skipped"].startswith("speed gate")
        speedup = t.user_attrs["speedup"]
        assert 0 < speedup < 50 * 0.98
        assert t.system_attrs[CONSTRAINTS_ATTR] == pytest.approx([50 - speedup, 0.0])
    assert out.count("pruned: speed gate") == 3

    code, out, err = run_cli(argv[:-2] + ["--n-trials", "1", "--no-speed-gate"])
    assert code == 0, out + err
    last = load_study(storage_url(tmp_path)).trials[-1]
    assert last.state == TrialState.COMPLETE and "clip_score" in last.user_attrs


def test_speed_gate_in_max_mode_only_skips_configs_slower_than_the_best(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = run_args(tmp_path, "--max-loss", "0.5", "--repeats", "1", "--speed-gate", "--n-trials", "2")
    code, out, err = run_cli(argv)  # the two warm-start configurations (DeepCache N=3, 5)
    assert code == 0, out + err
    study = load_study(storage_url(tmp_path))
    assert study.trials[0].state == TrialState.COMPLETE  # nothing to beat yet
    # then a configuration surely slower than the best: everything off (the baseline, about 1x)
    study.enqueue_trial({"deepcache": False, "tome": False, "tgate": False})
    code, out, err = run_cli(argv[:-2] + ["--n-trials", "1"])
    assert code == 0, out + err
    study = load_study(storage_url(tmp_path))
    best = best_feasible(study, Goal("max", None, 0.5))
    assert best is not None and best.number < 2
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert 2 in [t.number for t in pruned] and "pruned: speed gate" in out
    for t in study.trials:
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["speedup"] < best.user_attrs["speedup"]
            assert CONSTRAINTS_ATTR not in t.system_attrs


# --- the paired timing protocol, as the search uses it (the protocol itself: tests/measure/test_measure.py) -----


def test_trial_speedup_comes_from_its_paired_baseline_calls(tmp_path, monkeypatch):
    from optimize.measure import evaluator as measure

    paired = []  # the baseline floor of each measurement's paired rounds, in order (None: unpaired)
    original = measure.Evaluator.measure

    def record(self, *args, **kwargs):
        m = original(self, *args, **kwargs)
        paired.append(m.reference.best if m.reference is not None else None)
        return m

    monkeypatch.setattr(measure.Evaluator, "measure", record)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(run_args(tmp_path, "--max-loss", "0.5", "--repeats", "2", "--scored-repeats", "3",
                                      "--n-trials", "2", "--no-speed-gate"))
    assert code == 0, out + err
    study = load_study(storage_url(tmp_path))
    assert paired[0] is None and len(paired) == 1 + len(study.trials) == 3  # the study's baseline, then the trials
    for t, reference in zip(study.trials, paired[1:]):
        a = t.user_attrs
        assert a["speedup"] == pytest.approx(a["baseline_time"] / a["time_per_image"])
        assert a["baseline_time"] == reference  # timed beside the trial, not the stored baseline's time
        assert a["baseline_spread"] >= 0
        assert a["rounds"] == 3  # scored trials are topped up to --scored-repeats


@pytest.mark.slow  # three trials at the CPU default of 6 paired rounds: 30-60 s on a loaded 2-core machine
def test_on_the_cpu_default_every_trial_is_a_paired_ratio_and_a_resumed_run_times_no_baseline_of_its_own(
        tmp_path, monkeypatch):
    """Without --repeats on a CPU every measured trial carries paired rounds and its speedup is the ratio of
    its own baseline calls to its configured calls, in every run: a resumed run divides by no re-timed
    baseline, so the trials of both runs rank on the same footing. A stored baseline whose time is far from
    this run's (the machine's load changed) is one note, and moves no speedup."""
    from optimize.measure import evaluator as measure

    gate, scored = measure.default_rounds("cpu", "eager")
    paired = []  # per measurement: the baseline floor of its paired rounds (None: unpaired)
    original = measure.Evaluator.measure

    def record(self, *args, **kwargs):
        try:
            m = original(self, *args, **kwargs)
        except Exception:
            paired.append("gated")
            raise
        paired.append(m.reference.best if m.reference is not None else None)
        return m

    monkeypatch.setattr(measure.Evaluator, "measure", record)
    monkeypatch.chdir(tmp_path)
    argv = run_args(tmp_path, "--max-loss", "0.5", "--n-trials", "2", small=DEFAULT_TIMING)
    code, out, err = run_cli(argv)
    assert code == 0, out + err
    study = load_study(storage_url(tmp_path))
    stored = study.user_attrs["baseline"]
    # the stored baseline as if measured while the machine was 50x slower
    study.set_user_attr("baseline", {**stored, "time_per_image": 50 * stored["time_per_image"]})
    study.enqueue_trial({"deepcache": True, "deepcache.cache_interval": 4, "deepcache.cache_branch_id": 0,
                         "tome": False, "tgate": False})
    code, out2, err = run_cli(argv[:-2] + ["--n-trials", "1"])
    assert code == 0, out2 + err
    assert "reusing the stored baseline" in out2
    assert out2.count("note: the untouched pipeline took") == 1 and "load changed" in out2
    study = load_study(storage_url(tmp_path))
    trials = study.trials
    assert paired[0] is None and len(paired) == 1 + len(trials) == 4  # run 1's baseline, then the trials
    for t, reference in zip(trials, paired[1:]):
        a = t.user_attrs
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        assert a["rounds"] == (scored if t.state == TrialState.COMPLETE else gate)
        assert a["speedup"] == pytest.approx(a["baseline_time"] / a["time_per_image"])
        if reference != "gated":
            assert a["baseline_time"] == reference  # timed beside the trial
        assert a["speedup"] < 20  # not divided by the stored (50x slow) baseline time


# --- what a trial's measurement cost ------------------------------------------------------------------

def test_a_trial_records_its_wall_time_and_compile_seconds_however_it_ends(monkeypatch):
    """compile_s: what torch spent compiling during the measurement; wall_s: the measurement end to end.
    A gated trial has both; a trial that reused an earlier measurement spent neither and has neither."""
    import numpy as np

    from optimize.measure.evaluator import Measurement, Timing
    from optimize.search import Objective, SearchSpace
    from optimize.search import objective as objective_module
    from optimize.study.baseline import Baseline
    from optimize.study.record import COMPILE_SECONDS, PARTS, REUSED_FROM, SKIPPED, WALL

    compiled = [0.0]
    monkeypatch.setattr(objective_module, "compile_seconds", lambda: compiled[0])

    class Evaluator:
        repeats = 1

        def measure(self, config, gate=None):
            compiled[0] += 2.5  # the first call of a compiled configuration compiles
            timing, reference = Timing.from_samples([0.5, 0.5]), Timing.from_samples([1.0, 1.0])
            if gate is not None and config.deepcache.cache_interval == 4:
                gate(timing, reference)
            return Measurement(config, timing, np.ones(4), [], reference)

    baseline = Baseline(1.0, 0.0, 1.0, [1.0] * 4, {}, 32, 32, [1.0, 1.0])
    study = optuna.create_study(directions=["minimize"])
    objective = Objective(Evaluator(), baseline, Goal("target", 1.5, 0.5), SearchSpace(
        ("deepcache",), Context(steps=8, max_branch_id=3)))
    objective.gate_margin = -10.0  # the gate stops everything it judges
    for interval in (3, 3, 4):
        study.enqueue_trial({"deepcache": True, "deepcache.cache_interval": interval, "deepcache.cache_branch_id": 0})
    study.optimize(objective, n_trials=3)
    measured, reused, gated = study.trials
    assert measured.state == TrialState.COMPLETE and measured.user_attrs[COMPILE_SECONDS] == 2.5
    assert measured.user_attrs[PARTS]["compile"] == 2.5 and 0 <= measured.user_attrs[WALL] < 60
    # a reused measurement compiled nothing: its wall time is its own, the compile seconds are not copied
    assert reused.user_attrs[REUSED_FROM] == 0 and COMPILE_SECONDS not in reused.user_attrs
    assert "compile" not in reused.user_attrs[PARTS]
    assert gated.state == TrialState.PRUNED and SKIPPED in gated.user_attrs
    assert gated.user_attrs[COMPILE_SECONDS] == 2.5 and WALL in gated.user_attrs


def test_a_draw_the_levers_refuse_is_pruned_with_the_reason_not_failed():
    """Every layout setting off is the untouched UNet: the evaluator's validation refuses it before
    anything runs, and the trial says why, pruned; the next draw is measured."""
    import numpy as np

    from optimize.levers import Config
    from optimize.measure.evaluator import Measurement, Timing
    from optimize.search import Objective, SearchSpace
    from optimize.study.baseline import Baseline
    from optimize.study.record import SKIPPED

    class Evaluator:
        repeats = 1

        def measure(self, config, gate=None):
            Config.validate(config)  # as the real evaluator does first
            return Measurement(config, Timing.from_samples([0.5, 0.5]), np.ones(4), [], Timing.from_samples([1.0, 1.0]))

    baseline = Baseline(1.0, 0.0, 1.0, [1.0] * 4, {}, 32, 32, [1.0, 1.0])
    study = optuna.create_study(directions=["minimize"])
    objective = Objective(Evaluator(), baseline, Goal("target", 1.5, 0.5), SearchSpace(("layout",), Context(steps=8)))
    for sdpa in ("default", "math"):
        study.enqueue_trial({"layout": True, "layout.channels_last": False, "layout.fused_qkv": False,
                             "layout.sdpa": sdpa})
    study.optimize(objective, n_trials=2)
    refused, measured = study.trials
    assert refused.state == TrialState.PRUNED
    assert refused.user_attrs[SKIPPED].startswith("not a configuration: layout.channels_last")
    assert measured.state == TrialState.COMPLETE and measured.user_attrs["config"] == "math"
