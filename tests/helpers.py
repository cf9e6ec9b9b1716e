"""Shared helpers for tests/search/test_search.py and tests/app/test_cli.py.

``run_cli`` calls ``optimize.app.cli.main`` in-process and returns ``(exit code, stdout, stderr)``;
``shared_run`` runs a small search once per test session (cached here, so both test modules reuse it)
and hands back where its storage, study and output live. Tests that use a shared run must only read it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace

import optuna

# The cheapest settings that still exercise every method (T-GATE needs more than 4 steps).
# Plumbing tests score with the random tiny-clip model: losses stay near 0 whatever the shipped testbed
# weights are, so trials are feasible; the testbed's quality is checked in test_testbed.py.
DEFAULT_TIMING = ["--pipe", "tiny", "--steps", "8", "--num-samples", "2", "--clip-model", "tiny-clip", "--no-progress",
                  "--methods", "deepcache,tome,tgate"]
# Plumbing tests keep the three caching levers and their two warm starts, so that trial counts and
# orders stay what they test (the schedule lever's own runs are in tests/app/test_schedule_search.py); they
# time in the fewest paired rounds and score every trial (the CPU defaults, 3 gate and 6 scored rounds
# with the speed gate on, would multiply their calls); tests of the timing pass DEFAULT_TIMING or their
# own --repeats / --speed-gate (the last of a repeated option wins).
SMALL = DEFAULT_TIMING + ["--repeats", "1", "--scored-repeats", "2", "--no-speed-gate"]


def run_cli(argv) -> tuple[int, str, str]:
    """Run ``optimize-sd ARGV`` in this process; return (exit code, stdout, stderr).

    Exceptions other than SystemExit propagate (an uncaught traceback is a bug the test should see).
    """
    from optimize.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        else:  # main always exits; returning normally would be a bug of its own
            code = None
    return code, out.getvalue(), err.getvalue()


def storage_url(directory) -> str:
    return f"sqlite:///{os.path.join(str(directory), 's.db')}"


def run_args(directory, *extra, small=SMALL) -> list[str]:
    """``run`` arguments with the storage and output inside ``directory``."""
    return ["run", *small, "--storage", storage_url(directory),
            "--output", os.path.join(str(directory), "search_params.json"), *extra]


def goal_opts(steps: int = 8, target: float | None = None, max_loss: float = 0.02, scheduler: str = "ddim",
              mode: str | None = None, loss_metric: str = "clip"):
    """The (spec, opts) pair that runner.study_name_for / params_file.search_params_key read."""
    from optimize.runtime.pipelines import resolve_pipe
    from optimize.study.record import Goal

    goal = Goal(mode or ("target" if target is not None else "max"), target, max_loss, loss_metric)
    return resolve_pipe("tiny"), SimpleNamespace(scheduler=scheduler, steps=steps, goal=goal, exec_mode="eager")


def load_study(url: str, name: str | None = None) -> optuna.Study:
    storage = optuna.storages.RDBStorage(url)
    if name is None:
        (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


@dataclass
class Run:
    directory: str
    storage: str
    output: str
    study_name: str
    argv: list[str]
    code: int
    out: str
    err: str
    extra: dict = field(default_factory=dict)

    def study(self) -> optuna.Study:
        return load_study(self.storage, self.study_name)


_RUNS: dict[str, Run] = {}


def shared_run(tmp_path_factory, key: str, extra: list[str], *, target: float | None, max_loss: float,
               prewrite: dict | None = None, mode: str | None = None, loss_metric: str = "clip") -> Run:
    """Run ``optimize-sd run SMALL EXTRA`` once per session in its own directory (cwd there)."""
    if key in _RUNS:
        return _RUNS[key]
    import json

    import pytest

    directory = str(tmp_path_factory.mktemp(key))
    argv = run_args(directory, *extra)
    output = os.path.join(directory, "search_params.json")
    if prewrite is not None:
        with open(output, "w") as f:
            json.dump(prewrite, f)
    from optimize.app.runner import study_name_for

    name = study_name_for(*goal_opts(target=target, max_loss=max_loss, mode=mode, loss_metric=loss_metric))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(directory)
        code, out, err = run_cli(argv)
    run = Run(directory, storage_url(directory), output, name, argv, code, out, err, {"prewrite": prewrite})
    _RUNS[key] = run
    return run


def target_run(tmp_path_factory) -> Run:
    """Target mode, 4 trials."""
    return shared_run(tmp_path_factory, "target", ["--target-speedup", "1.2", "--n-trials", "4"],
                      target=1.2, max_loss=0.02)


def max_run(tmp_path_factory) -> Run:
    """Max mode with a loose bound (CLIP losses on the tiny model are ~0.003), 4 trials, and an
    unrelated key already in search_params.json."""
    return shared_run(tmp_path_factory, "max", ["--max-loss", "0.05", "--n-trials", "4"],
                      target=None, max_loss=0.05, prewrite={"some:other:key": {"keep": [1, 2, 3]}})


def pareto_run(tmp_path_factory) -> Run:
    """Pareto mode on 1 - SSIM with a bound between the two warm-start trials' losses (DeepCache N=3
    about 0.32, N=5 about 0.41 on the trained tiny pipeline at 8 steps), so the study has feasible and
    infeasible trials; 6 trials, 2 images each."""
    return shared_run(tmp_path_factory, "pareto", ["--mode", "pareto", "--loss-metric", "ssim", "--max-loss", "0.37",
                                                   "--n-trials", "6", "--images-per-trial", "2"],
                      target=None, max_loss=0.37, mode="pareto", loss_metric="ssim")


def sqlite_rows(db_path: str, query: str, params=()) -> list[tuple]:
    """Read the study database directly (works while another process writes it)."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(query, params).fetchall()
    finally:
        con.close()


# --- studies made without a model (tests/app/test_report.py, tests/app/test_generate.py) -----------------

TINY_FINGERPRINT = {
    "pipe": "tiny", "scheduler": "ddim", "steps": 8, "guidance": None, "height": None, "width": None,
    "dtype": "fp32", "device": "cpu", "batch_size": 1, "prompts": "0", "num_samples": 2, "seed": 42,
    "clip": "tiny-clip/None",
}


def _distributions():
    """The distributions a search of TINY_FINGERPRINT's settings draws from (the levers' declared ranges)."""
    from optimize.levers import LEVERS, Context

    ctx = Context(steps=TINY_FINGERPRINT["steps"], max_branch_id=5, scheduler="ddim")
    return {k: v for lever in LEVERS for k, v in lever.distributions(ctx).items()}


def synthetic_study(url: str, name: str, goal, trials, fingerprint: dict | None = None,
                    baseline_size: int = 64) -> optuna.Study:
    """A study as ``optimize-sd run`` leaves it, with made-up measurements and no model.

    ``trials``: ``(config, speedup, score_loss[, extra user attrs])`` per trial (``config`` an
    ``optimize.Config``); ``speedup=None`` makes a failed trial. Constraints are stored as the search stores them.
    """
    from optimize.study.baseline import Baseline
    from optimize.study.record import CONSTRAINTS_ATTR, STUDY_ATTR
    from optuna.trial import TrialState, create_trial

    dists = _distributions()
    fingerprint = dict(TINY_FINGERPRINT if fingerprint is None else fingerprint)
    study = optuna.create_study(storage=url, study_name=name, directions=goal.directions)
    study.set_user_attr(STUDY_ATTR, {"goal": goal.as_dict(), "constraints": goal.constraint_names,
                                        "fingerprint": fingerprint})
    Baseline(0.1, 0.02, 30.0, [30.0, 30.0], fingerprint, baseline_size, baseline_size).save(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental in Optuna
        study.set_metric_names(goal.metric_names)
    for config, speedup, loss, *extra in trials:
        params = config.to_params()
        distributions = {k: dists[k] for k in params}
        if speedup is None:
            study.add_trial(create_trial(state=TrialState.FAIL, params=params, distributions=distributions,
                                         user_attrs={"config": config.label(), "error": "RuntimeError: made up"}))
            continue
        attrs = {"config": config.label(), "speedup": speedup, "score_loss": loss, "time_per_image": 0.1 / speedup,
                 "time_median": 0.1 / speedup, "spread": 0.02, "clip_score": 30.0 * (1 - loss), "baseline_time": 0.1, **(extra[0] if extra else {})}
        value = goal.value(speedup, goal.loss(attrs))
        study.add_trial(create_trial(
            state=TrialState.COMPLETE, values=value if isinstance(value, list) else [value], params=params,
            distributions=distributions, user_attrs=attrs,
            system_attrs={CONSTRAINTS_ATTR: goal.constraints(speedup, goal.loss(attrs))}))
    return study


ERROR_PREFIX = "optimize-sd: error:"


def one_error_line(code, out, err, exit_code: int = 2) -> str:
    """The single ``optimize-sd: error:`` line of a failed command. Bad input (exit 2) prints nothing
    else; a fault during a run (exit 1) may follow the run's own output."""
    assert code == exit_code, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    assert "Traceback" not in out + err
    if exit_code == 2:
        assert not out.strip(), out
    return lines[0]
