"""``optimize-sd`` as a user meets it: bad input fails fast with one line, a study made with other
settings is refused before anything loads, ``search_params.json`` is kept consistent, ``best`` reports.

Runs are in-process (``optimize.app.cli.main``); the two 4-trial searches are shared with test_search.py.
"""

from __future__ import annotations

import glob
import json
import os

import optuna
import pytest

try:
    from helpers import SMALL, one_error_line, goal_opts, load_study, run_args, run_cli, storage_url
except ImportError:  # tests/ made a package
    from tests.helpers import SMALL, one_error_line, goal_opts, load_study, run_args, run_cli, storage_url

from optimize.app import params_file


from optimize.app import runner
from optimize.study.record import Goal, best_feasible


# --- 7. bad input -------------------------------------------------------------------------------------


def _prompt_file(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


BAD = {
    "unknown preset": (["--pipe", "sd9"], "sd9"),
    "unknown scheduler": (["--scheduler", "nope"], "--scheduler"),
    "gpu: graphs on the cpu": (["--exec", "graphs", "--device", "cpu"], "--exec graphs needs a CUDA device"),
    "gpu: compile on the cpu": (["--exec", "compile"], "--exec compile needs a CUDA device"),
    "unknown exec": (["--exec", "fast"], "--exec"),
    "target 1.0": (["--target-speedup", "1.0"], "--target-speedup"),
    "target 0.5": (["--target-speedup", "0.5"], "--target-speedup"),
    "max-loss 0": (["--max-loss", "0"], "--max-loss"),
    "max-loss 1.5": (["--max-loss", "1.5"], "--max-loss"),
    "max-loss negative": (["--max-loss", "-0.1"], "--max-loss"),
    "missing prompts": (["--prompts", "{tmp}/missing.txt"], "missing.txt"),
    "prompts dir": (["--prompts", "{tmp}"], "prompts"),
    "prompts bad ext": (["--prompts", "{tmp}/p.bin"], "p.bin"),
    "prompts empty": (["--prompts", "{tmp}/empty.txt"], "empty.txt"),
    "prompts not utf-8": (["--prompts", "{tmp}/latin.txt"], "latin.txt"),
    "prompts too few": (["--prompts", "{tmp}/one.txt"], "one.txt"),
    "prompts json not list": (["--prompts", "{tmp}/obj.json"], "obj.json"),
    "cuda without gpu": (["--device", "cuda"], "cuda"),
    "cuda:1 without gpu": (["--device", "cuda:1"], "cuda"),
    "bad device": (["--device", "tpu"], "tpu"),
    "unknown method": (["--methods", "foo"], "foo"),
    "no method": (["--methods", ","], "--methods"),
    "redis storage": (["--storage", "redis://x"], "redis://x"),
    "storage no scheme": (["--storage", "studies.db"], "studies.db"),
    "num-samples 0": (["--num-samples", "0"], "--num-samples"),
    "fp16 on cpu": (["--dtype", "fp16", "--device", "cpu"], "fp16"),
    "guidance 1 with tgate": (["--guidance", "1"], "T-GATE"),
    "steps 0": (["--steps", "0"], "--steps"),
    "n-trials 0": (["--n-trials", "0"], "--n-trials"),
    "score-batch 0": (["--score-batch", "0"], "--score-batch"),
    "score-batch negative": (["--score-batch", "-4"], "--score-batch"),
    "score-batch not a number": (["--score-batch", "eight"], "--score-batch"),
    "unknown option": (["--bogus"], "--bogus"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_loads_nothing(case, tmp_path, monkeypatch, no_model):
    import torch

    if "gpu" in case and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _prompt_file(tmp_path, "p.bin", b"a cat\n")
    _prompt_file(tmp_path, "empty.txt", b"\n  \n")
    _prompt_file(tmp_path, "latin.txt", "caf\xe9 au lait\n".encode("latin-1"))
    _prompt_file(tmp_path, "one.txt", b"a single prompt\n")
    _prompt_file(tmp_path, "obj.json", b'{"prompt": "a cat"}')
    args, needle = BAD[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    monkeypatch.chdir(tmp_path)
    # SMALL comes first so that the case's own value of an option wins
    code, out, err = run_cli(run_args(tmp_path, *args))
    line = one_error_line(code, out, err)
    assert needle in line, line
    assert not os.path.exists(tmp_path / "search_params.json")


def test_unreadable_prompts_file(tmp_path, monkeypatch, no_model):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    p = _prompt_file(tmp_path, "secret.txt", b"a cat\na dog\n")
    os.chmod(p, 0)
    monkeypatch.chdir(tmp_path)
    line = one_error_line(*run_cli(run_args(tmp_path, "--prompts", p)))
    assert "secret.txt" in line


@pytest.mark.parametrize("command", [["run", "--help"], ["best", "--help"], ["--help"], ["run", "-h"]])
def test_help_exits_zero(command, no_model):
    code, out, err = run_cli(command)
    assert code == 0, err
    assert "Usage:" in out and not err
    if command[0] == "run":
        assert "--target-speedup" in out and "--max-loss" in out
    if command[0] == "best":
        assert "--json" in out


def test_ctrl_c_while_the_commands_load_is_one_line(monkeypatch, capsys):
    """`optimize-sd` imports torch and diffusers for a second or more before any command runs; a Ctrl-C
    there was a traceback from the middle of an import."""
    import sys

    import optimize.cli

    class Interrupting:
        def find_spec(self, name, path=None, target=None):
            if name == "optimize.app.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "optimize.app.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    with pytest.raises(SystemExit) as exit_:
        optimize.cli.main(["--help"])
    assert exit_.value.code == 130 and capsys.readouterr().err == "optimize-sd: interrupted\n"


# --- 3. a study made with other settings is refused before anything loads ------------------------------


@pytest.mark.parametrize("change,names", [
    (["--steps", "10"], ["steps"]),
    (["--num-samples", "3"], ["num_samples", "prompts"]),
    (["--seed", "7"], ["seed"]),
    (["--scheduler", "euler"], ["scheduler"]),
])
def test_changed_settings_are_refused(change, names, target, tmp_path, monkeypatch, no_model):
    assert target.code == 0, target.out + target.err
    before = target.study()
    n_before, attrs_before = len(before.trials), dict(before.user_attrs)
    monkeypatch.chdir(tmp_path)
    argv = run_args(target.directory, "--target-speedup", "1.2", "--n-trials", "1", "--study", target.study_name,
                    *change)
    line = one_error_line(*run_cli(argv))
    for name in names:
        assert name in line, line
    assert "steps" not in line or "steps" in names  # names what differs, and only that
    after = target.study()
    assert len(after.trials) == n_before and after.user_attrs == attrs_before


def test_other_goal_is_refused(target, tmp_path, monkeypatch, no_model):
    assert target.code == 0, target.out + target.err
    n_before = len(target.study().trials)
    monkeypatch.chdir(tmp_path)
    for goal in (["--max-loss", "0.05"], ["--target-speedup", "1.5"], ["--target-speedup", "1.2", "--max-loss", "0.03"]):
        line = one_error_line(*run_cli(run_args(target.directory, *goal, "--study", target.study_name)))
        assert target.study_name in line and "goal" in line, line
    assert len(target.study().trials) == n_before


# --- 5. search_params.json -----------------------------------------------------------------------------


def test_search_params_written(maxrun):
    assert maxrun.code == 0, maxrun.out + maxrun.err
    key = params_file.search_params_key(*goal_opts(max_loss=0.05))
    assert key == "tiny:ddim:8:max:0.05"
    with open(maxrun.output) as f:
        data = json.load(f)
    assert data["some:other:key"] == {"keep": [1, 2, 3]}  # an unrelated key is kept
    assert set(data) == {"some:other:key", key}
    entry = data[key]
    for k in ("params", "speedup", "time_per_image", "score_loss", "model", "scheduler", "steps", "mode", "max_loss"):
        assert k in entry, k
    study = maxrun.study()
    best = best_feasible(study, Goal("max", None, 0.05))
    assert entry["trial"] == best.number
    assert entry["params"] == best.params
    assert entry["speedup"] == best.user_attrs["speedup"]
    assert entry["score_loss"] == best.user_attrs["score_loss"]
    assert entry["time_per_image"] == best.user_attrs["time_per_image"]
    assert (entry["model"], entry["scheduler"], entry["steps"], entry["mode"], entry["max_loss"]) == (
        "tiny", "ddim", 8, "max", 0.05)
    assert entry["baseline_time_per_image"] == study.user_attrs["baseline"]["time_per_image"]
    assert f"saved to {maxrun.output} under {key!r}" in maxrun.out
    assert not glob.glob(os.path.join(maxrun.directory, ".search_params.*.tmp"))


def test_search_params_broken_during_run_is_not_overwritten(tmp_path, monkeypatch):
    """(A loss bound of 0.5 makes every trial feasible, so every trial tries to save.)
    The file turns invalid while the study runs: it is left as the user made it, the run warns and
    goes on to finish every trial, and ends with one error line and exit 1: never "saved"."""
    out_path = tmp_path / "search_params.json"
    junk = b'{"tiny:ddim:8:max:0.5": {"params": {}},,, oops'
    original = runner.update_search_params

    def break_then_update(path, key, entry):
        out_path.write_bytes(junk)
        return original(path, key, entry)

    monkeypatch.setattr(runner, "update_search_params", break_then_update)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(run_args(tmp_path, "--max-loss", "0.5", "--n-trials", "2"))
    errors = [line for line in err.splitlines() if line.startswith("optimize-sd: error:")]
    assert code == 1 and len(errors) == 1, out + err
    assert f"{out_path} not updated: {out_path} is not valid JSON" in errors[0] and "the study keeps every trial" in errors[0]
    assert "saved to" not in out
    assert out_path.read_bytes() == junk
    assert "warning: " in err
    assert not glob.glob(str(tmp_path / ".search_params.*.tmp"))
    study = optuna.load_study(study_name="tiny-ddim-8steps-max-loss0.5", storage=f"sqlite:///{tmp_path}/s.db")
    assert len(study.trials) == 2


def test_invalid_search_params_fails_fast(tmp_path, monkeypatch, no_model):
    out_path = tmp_path / "search_params.json"
    out_path.write_text("[1, 2")
    monkeypatch.chdir(tmp_path)
    line = one_error_line(*run_cli(run_args(tmp_path, "--max-loss", "0.05", "--n-trials", "1")))
    assert "search_params.json" in line
    assert out_path.read_text() == "[1, 2"


# --- 6. best -------------------------------------------------------------------------------------------


def test_every_trial_records_its_parts_and_the_baseline_its_scoring_batch(maxrun):
    """Each trial stores the wall seconds of its parts and of the whole trial; the study's baseline
    stores its scoring batch (the CPU default, at most the 2 prompts), which its trials scored in."""
    from optimize.study.baseline import Baseline
    from optimize.study.record import PARTS, REUSED_FROM, SEQUENTIAL_PARTS, WALL

    study = maxrun.study()
    assert Baseline.load(study).score_batch == 2
    assert "2 per scoring call" in maxrun.out
    measured = [t for t in study.trials if "speedup" in t.user_attrs and REUSED_FROM not in t.user_attrs]
    assert measured
    for t in measured:
        parts = t.user_attrs[PARTS]
        assert set(SEQUENTIAL_PARTS) | {"apply"} <= set(parts) and all(v >= 0 for v in parts.values())
        # the parts ran one after another inside the trial
        assert sum(parts[k] for k in SEQUENTIAL_PARTS) <= t.user_attrs[WALL] <= (t.duration.total_seconds() + 1)
        assert f"took {t.user_attrs[WALL]:.1f} s" in maxrun.out


def test_best_text_and_json(maxrun, no_model):
    assert maxrun.code == 0, maxrun.out + maxrun.err
    study = maxrun.study()
    best = best_feasible(study, Goal("max", None, 0.05))
    assert best is not None

    code, out, err = run_cli(["best", "--storage", maxrun.storage])
    assert code == 0, err
    assert f"{maxrun.study_name}: best feasible trial #{best.number}: {best.user_attrs['config']}" in out
    assert f"{best.user_attrs['speedup']:.2f}x" in out

    code, out, err = run_cli(["best", "--storage", maxrun.storage, "--json", "--study", maxrun.study_name])
    assert code == 0, err
    data = json.loads(out)
    assert data["study"] == maxrun.study_name
    assert data["goal"] == {"mode": "max", "target_speedup": None, "max_loss": 0.05, "loss_metric": "clip"}
    assert data["best"]["trial"] == best.number
    assert data["best"]["params"] == best.params
    assert data["best"]["speedup"] == best.user_attrs["speedup"]
    assert data["baseline"]["time_per_image"] == study.user_attrs["baseline"]["time_per_image"]


def test_best_target_mode_matches_exit_code(target, no_model):
    """Whether the 1.2x target was met depends on timing: best must agree with best_feasible either way."""
    assert target.code == 0, target.out + target.err
    best = best_feasible(target.study(), Goal("target", 1.2, 0.02))
    code, out, err = run_cli(["best", "--storage", target.storage, "--json"])
    data = json.loads(out)
    assert data["goal"]["mode"] == "target" and data["goal"]["target_speedup"] == 1.2
    if best is None:
        assert code == 1 and data["best"] is None
    else:
        assert code == 0 and data["best"]["trial"] == best.number


def test_best_without_feasible_trial_exits_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(run_args(tmp_path, "--target-speedup", "50", "--n-trials", "1"))
    assert code == 0, out + err
    assert "no feasible trial yet" in out and "saved to" not in out
    assert not os.path.exists(tmp_path / "search_params.json")
    study = load_study(storage_url(tmp_path))
    assert study.trials[0].system_attrs["constraints"][0] > 0  # 50x was not reached

    code, out, err = run_cli(["best", "--storage", storage_url(tmp_path)])
    assert code == 1
    assert "no feasible trial yet" in out
    code, out, err = run_cli(["best", "--storage", storage_url(tmp_path), "--json"])
    assert code == 1
    data = json.loads(out)
    assert data["best"] is None and data["study"] == study.study_name
    assert data["baseline"]["time_per_image"] > 0


def test_best_errors(tmp_path, target, no_model):
    line = one_error_line(*run_cli(["best", "--storage", storage_url(tmp_path)]))
    assert "no study" in line
    line = one_error_line(*run_cli(["best", "--storage", target.storage, "--study", "nope"]))
    assert "nope" in line and target.study_name in line
    line = one_error_line(*run_cli(["best", "--storage", "redis://x"]))
    assert "redis://x" in line
    # a study optimize-sd did not create
    other = storage_url(tmp_path / "other")
    os.makedirs(tmp_path / "other")
    optuna.create_study(study_name="foreign", storage=other)
    line = one_error_line(*run_cli(["best", "--storage", other]))
    assert "foreign" in line and "not created by optimize-sd" in line


def test_height_not_multiple_of_8_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(*run_cli(run_args(tmp_path, "--height", "12", "--n-trials", "1")))
    assert "12" in line


def test_dashboard_bad_storage_is_one_line(no_model):
    line = one_error_line(*run_cli(["dashboard", "--storage", "redis://x"]))
    assert "redis://x" in line
    code, out, err = run_cli(["dashboard", "--help"])
    assert code == 0 and "--artifact-dir" in out


# --- levers that cannot run on the run's device ------------------------------------------------------


@pytest.fixture
def layout_needs_a_gpu(monkeypatch):
    from optimize.levers import BY_NAME

    monkeypatch.setattr(BY_NAME["layout"], "unavailable",
                        lambda ctx: None if ctx.device is None or ctx.device.type == "cuda" else "needs a test GPU")


def test_a_default_lever_that_cannot_run_here_is_left_out_in_one_line(layout_needs_a_gpu, tmp_path, monkeypatch,
                                                                      no_model):
    from optimize.app.cli import check_run_options, run

    monkeypatch.chdir(tmp_path)
    argv = run_args(tmp_path, "--n-trials", "1", small=[a for a in SMALL if a != "deepcache,tome,tgate"
                                                          and a != "--methods"])
    spec, opts = check_run_options(run.make_context("run", argv[1:]).params)
    assert "layout" not in opts.methods and {"schedule", "deepcache", "tgate", "vae"} <= set(opts.methods)
    assert len(opts.notes) == 1 and opts.notes[0].startswith("note: left out of the search on cpu: ")
    assert "layout: needs a test GPU" in opts.notes[0]
    lines = []
    runner.prepare_study(spec, opts, echo=lambda line, err=False: lines.append(line))  # before anything loads
    assert lines == list(opts.notes)


def test_naming_a_lever_that_cannot_run_here_is_refused(layout_needs_a_gpu, tmp_path, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(*run_cli(run_args(tmp_path, "--methods", "deepcache,layout")))
    assert "--methods: layout cannot run on cpu: needs a test GPU (leave it out of --methods)" in line
    assert not os.path.exists(tmp_path / "search_params.json")


def test_what_a_cpu_run_leaves_out():
    """Named: only what cannot run on the CPU (the compile lever; precision without torchao). By default
    also the levers that only speed up a GPU's step (layout; precision)."""
    import importlib.util

    from optimize.levers import METHODS
    from optimize.levers.base import GPU_ONLY

    named = runner.unavailable_methods(METHODS, "cpu", explicit=True)
    no_torchao = importlib.util.find_spec("torchao") is None
    # precision, searched only together with compile, is left out with it where torchao is installed too
    assert set(named) == {"compile", "precision"}
    assert named["precision"] == ("torchao is not installed (pip install 'optimize-sd[gpu]')" if no_torchao
                                  else "searched only together with compile, which this run does not search")
    default = runner.unavailable_methods(METHODS, "cpu")
    assert set(default) == {"compile", "layout", "precision"} and default["layout"] == GPU_ONLY


REQUIRES_COMPILE = "searched only together with compile, which this run does not search"


@pytest.fixture
def torchao_here(monkeypatch):
    """The precision lever available as far as torchao goes, whatever this machine has installed."""
    from optimize.levers import precision

    monkeypatch.setattr(precision, "torchao_missing", lambda: None)


def test_precision_is_left_out_where_compile_is_not_searched(torchao_here, monkeypatch):
    """precision runs here (torchao taken as installed; named, so its GPU-only gain does not count), but
    is searched only together with compile: left out where compile is not among the methods, or is left
    out itself (on the CPU), with that reason; kept where compile is searched."""
    from optimize.levers import BY_NAME, Context, Device
    from optimize.levers.base import GPU_ONLY

    assert BY_NAME["precision"].unavailable(Context(device=Device("cpu"))) is None
    assert runner.unavailable_methods(("deepcache", "precision"), "cpu", explicit=True) == {
        "precision": REQUIRES_COMPILE}
    # not named: its own reason (no gain on the CPU) comes first
    assert runner.unavailable_methods(("deepcache", "precision"), "cpu") == {"precision": GPU_ONLY}
    # compile named, but it cannot run on the CPU: precision goes with it
    left_out = runner.unavailable_methods(("deepcache", "precision", "compile"), "cpu", explicit=True)
    assert set(left_out) == {"compile", "precision"} and left_out["precision"] == REQUIRES_COMPILE
    # a Hopper GPU with Triton: both searched; without compile, precision alone is still left out
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(BY_NAME["compile"], "unavailable", lambda ctx: None)
    assert runner.unavailable_methods(("deepcache", "precision", "compile"), "cuda:0", explicit=True) == {}
    assert runner.unavailable_methods(("deepcache", "precision", "compile"), "cuda:0") == {}
    assert runner.unavailable_methods(("deepcache", "precision"), "cuda:0") == {"precision": REQUIRES_COMPILE}


def test_naming_precision_without_compile_is_refused(torchao_here, tmp_path, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(*run_cli(run_args(tmp_path, "--methods", "precision,deepcache")))
    assert line.endswith("--methods: precision is searched only together with compile: add compile to --methods"), line
    assert not os.path.exists(tmp_path / "search_params.json")
