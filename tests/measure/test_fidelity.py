"""Fidelity to the baseline image (PSNR, SSIM, LPIPS), ``--loss-metric``, the stored baseline images, and
``--mode pareto``: on the tiny pipeline, with real images.

LPIPS needs torchvision's AlexNet weights, which cannot be downloaded here. The tests that use it save
a randomly initialised AlexNet where torchvision would have downloaded it (under a temporary
TORCH_HOME), so the real loading code runs; the values are then meaningless but real.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from optuna.trial import TrialState

try:
    from helpers import (goal_opts, load_study, one_error_line, pareto_run, run_args, run_cli, storage_url)
except ImportError:  # tests/ made a package
    from tests.helpers import (goal_opts, load_study, one_error_line, pareto_run, run_args, run_cli, storage_url)

from optimize.app import params_file

from optimize.app import runner
from optimize.levers import Config, DeepCache
from optimize.measure.metrics import FidelityScorer, lpips_weights_path
from optimize.study.record import PSNR_CAP
from optimize.study.artifacts import artifact_dir_for, baseline_image_ids
from optimize.study.record import CONSTRAINTS_ATTR, Goal, best_feasible, goal_of, is_feasible, pareto_front


@pytest.fixture
def no_lpips(tmp_path, monkeypatch):
    """An empty torch cache: LPIPS's weights are not there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture
def fake_lpips(tmp_path_factory, monkeypatch):
    """A random AlexNet saved where torchvision keeps the downloaded one. The classifier (which LPIPS
    does not use) is stored as expanded zeros, so the file is a few MB, not 233."""
    import torchvision

    home = tmp_path_factory.mktemp("torch-home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    path = lpips_weights_path()
    os.makedirs(os.path.dirname(path))
    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    state = {k: (v if k.startswith("features.") else torch.zeros(1).expand(v.shape)) for k, v in state.items()}
    torch.save(state, path)
    return path


# --- the metric on images ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(tiny_pipe):
    """The baseline configuration measured twice and DeepCache once, on two prompts."""
    from optimize.measure.evaluator import Evaluator, GenerationSettings
    from optimize.measure.metrics import ClipScorer

    settings = GenerationSettings(steps=6, guidance=7.5, height=32, width=32)
    ev = Evaluator(tiny_pipe, ClipScorer("tiny-clip", None), ["a red fox", "a boat on a lake"], settings)
    return {"base": ev.measure(Config(), paired=False).images, "again": ev.measure(Config(), paired=False).images,
            "dc": ev.measure(Config(deepcache=DeepCache(3, 0))).images}


def test_baseline_against_itself_is_perfect_and_finite(measured):
    values = FidelityScorer(measured["base"]).score(measured["again"])
    # an identical image: SSIM 1 and PSNR capped (infinite otherwise), so the attrs stay JSON numbers
    assert values == {"psnr": PSNR_CAP, "ssim": pytest.approx(1.0, abs=1e-6)}
    json.dumps(values, allow_nan=False)


def test_deepcache_images_are_less_faithful(measured):
    values = FidelityScorer(measured["base"]).score(measured["dc"])
    assert 0 < values["psnr"] < PSNR_CAP and math.isfinite(values["psnr"])
    assert 0 < values["ssim"] < 1


def test_lpips_with_cached_weights(measured, fake_lpips):
    scorer = FidelityScorer(measured["base"], lpips=True)
    assert scorer.score(measured["again"])["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert scorer.score(measured["dc"])["lpips"] > 0


def test_fidelity_refuses_images_of_other_prompts(measured):
    with pytest.raises(ValueError, match="1 images for 2 baseline images"):
        FidelityScorer(measured["base"]).score(measured["dc"][:1])


# --- --loss-metric in a search -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssim_run(tmp_path_factory):
    """Max mode bounded on 1 - SSIM; 3 trials (the first two: DeepCache N=3 and N=5)."""
    directory = tmp_path_factory.mktemp("ssim")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(directory)
        mp.setenv("TORCH_HOME", str(directory / "torch-home"))  # no LPIPS weights
        code, out, err = run_cli(run_args(directory, "--loss-metric", "ssim", "--max-loss", "0.005", "--n-trials", "3",
                                          "--images-per-trial", "0"))
    return directory, code, out, err


def test_ssim_bound_is_on_one_minus_ssim(ssim_run):
    directory, code, out, err = ssim_run
    assert code == 0, out + err
    name = runner.study_name_for(*goal_opts(max_loss=0.005, loss_metric="ssim"))
    assert name == "tiny-ddim-8steps-max-ssim0.005"
    study = load_study(storage_url(directory), name)
    goal = Goal("max", None, 0.005, "ssim")
    assert study.user_attrs["optimize_sd"]["goal"] == goal.as_dict()
    assert study.user_attrs["optimize_sd"]["constraints"] == ["1 - ssim <= max_loss"]
    trials = study.trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert trials[0].params["deepcache.cache_interval"] == 3  # warm start
    for t in trials:
        a = t.user_attrs
        assert 0 < a["ssim"] < 1 and 0 < a["psnr"] < PSNR_CAP and "lpips" not in a  # a real DeepCache change
        assert t.system_attrs[CONSTRAINTS_ATTR] == pytest.approx([(1 - a["ssim"]) - 0.005])
        assert is_feasible(t) == (1 - a["ssim"] <= 0.005)
        assert f"psnr {a['psnr']:.1f} ssim {a['ssim']:.3f}" in out
    # the one-time LPIPS note
    assert out.count("note: LPIPS not recorded") == 1 and lpips_weights_path() not in err
    key = params_file.search_params_key(*goal_opts(max_loss=0.005, loss_metric="ssim"))
    assert key == "tiny:ddim:8:max:ssim0.005"
    best = best_feasible(study, goal)
    if best is not None:
        entry = json.loads((directory / "search_params.json").read_text())[key]
        assert entry["trial"] == best.number and entry["loss_metric"] == "ssim"
        assert entry["loss"] == pytest.approx(1 - best.user_attrs["ssim"]) and entry["ssim"] == best.user_attrs["ssim"]


def test_baseline_images_kept_without_trial_images(ssim_run):
    directory, code, out, err = ssim_run
    study = load_study(storage_url(directory))
    assert sorted(baseline_image_ids(study)) == [0, 1]  # one per prompt, --images-per-trial 0 notwithstanding
    assert len(os.listdir(artifact_dir_for(storage_url(directory)))) == 2


def _count_baseline_measurements(monkeypatch):
    from optimize.measure import evaluator as measure

    calls = []
    original = measure.Evaluator.measure

    def measure_(self, config, *args, **kwargs):
        if kwargs.get("paired") is False:  # the baseline's pass (a trial's is paired where it can be)
            calls.append(config)
        return original(self, config, *args, **kwargs)

    monkeypatch.setattr(measure.Evaluator, "measure", measure_)
    return calls


def _capture_references(monkeypatch):
    refs = []
    original = runner.FidelityScorer

    def scorer(images, *args, **kwargs):
        refs.append([im.tobytes() for im in images])
        return original(images, *args, **kwargs)

    monkeypatch.setattr(runner, "FidelityScorer", scorer)
    return refs


def test_resume_reuses_stored_baseline_images_and_regenerates_missing_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = run_args(tmp_path, "--max-loss", "0.5", "--images-per-trial", "0")
    refs = _capture_references(monkeypatch)
    code, out, err = run_cli(argv + ["--n-trials", "1"])
    assert code == 0, out + err
    directory = artifact_dir_for(storage_url(tmp_path))

    calls = _count_baseline_measurements(monkeypatch)
    code, out, err = run_cli(argv + ["--n-trials", "1"])
    assert code == 0, out + err
    assert "reusing the stored baseline" in out and "generating them again" not in out
    assert calls == []  # read from the artifacts: nothing generated
    assert refs[1] == refs[0]

    # a worker without the artifact directory (another machine, or it was moved): generated again, same pixels
    shutil.move(directory, str(tmp_path / "moved"))
    code, out, err = run_cli(argv + ["--n-trials", "1"])
    assert code == 0, out + err
    lines = [line for line in out.splitlines() if "baseline images" in line]
    assert lines == [f"baseline images not found in {directory}: generating them again (2 prompts, same seeds)"]
    assert len(calls) == 1
    assert refs[2] == refs[0]  # deterministic: the same prompts and seeds give the same images
    study = load_study(storage_url(tmp_path))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert all("ssim" in t.user_attrs for t in study.trials)
    # the study's records still point at the moved files: no second set was uploaded
    assert len(baseline_image_ids(study)) == 2 and not os.listdir(directory)


def test_lpips_metric_bounds_lpips(tmp_path, monkeypatch, fake_lpips):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(run_args(tmp_path, "--loss-metric", "lpips", "--max-loss", "0.5", "--n-trials", "2",
                                      "--images-per-trial", "0"))
    assert code == 0, out + err
    assert "LPIPS not recorded" not in out
    study = load_study(storage_url(tmp_path))
    assert study.study_name == "tiny-ddim-8steps-max-lpips0.5"
    for t in study.trials:
        a = t.user_attrs
        assert a["lpips"] > 0 and {"psnr", "ssim"} <= set(a)
        assert t.system_attrs[CONSTRAINTS_ATTR] == pytest.approx([a["lpips"] - 0.5])


def test_damaged_lpips_weights_are_a_note_not_a_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    path = lpips_weights_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(run_args(tmp_path, "--max-loss", "0.5", "--n-trials", "1", "--images-per-trial", "0"))
    assert code == 0, out + err
    (note,) = [line for line in out.splitlines() if "LPIPS" in line]
    assert note.startswith(f"note: LPIPS not recorded: cannot load {path} (")
    a = load_study(storage_url(tmp_path)).trials[0].user_attrs
    assert {"psnr", "ssim"} <= set(a) and "lpips" not in a


def test_psnr_bound_is_a_minimum_in_db():
    goal = Goal("max", None, 30.0, "psnr")
    attrs = {"psnr": 27.5, "score_loss": 0.0}
    assert goal.loss(attrs) == -27.5 and goal.bound == -30.0
    assert goal.constraints(2.0, goal.loss(attrs)) == pytest.approx([2.5])  # min_psnr - psnr: infeasible
    assert goal.constraints(2.0, -31.0) == pytest.approx([-1.0])
    assert goal.slug == "max-psnr30" and goal.constraint_names == ["psnr >= min_psnr"]
    assert Goal("max", None, 0.02).slug == "max-loss0.02"  # CLIP keeps the names studies always had


# --- bad input: one line, nothing loaded -----------------------------------------------------------------


@pytest.mark.parametrize("extra,needle", [
    (["--mode", "pareto", "--target-speedup", "2"], "--target-speedup implies --mode target, not pareto"),
    (["--mode", "max", "--target-speedup", "2"], "--target-speedup implies --mode target, not max"),
    (["--mode", "target"], "--mode target needs --target-speedup"),
    (["--loss-metric", "psnr", "--max-loss", "0"], "minimum PSNR in dB: must be in (0, 100]"),
    (["--loss-metric", "ssim", "--max-loss", "1.5"], "--max-loss must be in (0, 1)"),
    (["--loss-metric", "lpips"], "--loss-metric lpips needs torchvision's AlexNet weights at"),
])
def test_bad_goal_is_one_line(extra, needle, tmp_path, monkeypatch, no_model, no_lpips):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(*run_cli(run_args(tmp_path, *extra)))
    assert needle in line, line
    assert not os.path.exists(tmp_path / "s.db")


def test_resumed_study_with_another_loss_metric_is_refused(ssim_run, monkeypatch, no_model):
    directory, *_ = ssim_run
    monkeypatch.chdir(directory)
    name = "tiny-ddim-8steps-max-ssim0.005"
    before = load_study(storage_url(directory), name).user_attrs
    line = one_error_line(*run_cli(run_args(directory, "--study", name, "--loss-metric", "psnr", "--max-loss", "30")))
    assert f"study '{name}' exists with goal" in line and "'loss_metric': 'ssim'" in line
    assert "'loss_metric': 'psnr'" in line and line.endswith("use another --study")
    assert load_study(storage_url(directory), name).user_attrs == before


# --- --mode pareto --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pareto(tmp_path_factory):
    run = pareto_run(tmp_path_factory)
    assert run.code == 0, run.out + run.err
    return run


def _dominates(a, b) -> bool:
    (sa, la), (sb, lb) = a, b
    return sa >= sb and la <= lb and (sa > sb or la < lb)


def test_pareto_study_has_two_objectives_under_the_bound(pareto):
    study = pareto.study()
    assert pareto.study_name == "tiny-ddim-8steps-pareto-ssim0.37"
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["speedup", "ssim_loss"]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6
    for t in complete:
        loss = 1 - t.user_attrs["ssim"]
        assert t.values == pytest.approx([t.user_attrs["speedup"], loss])
        assert t.system_attrs[CONSTRAINTS_ATTR] == pytest.approx([loss - 0.37])
    # the warm start's DeepCache N=3 is within the bound, N=5 is not: both kinds are in the study
    assert is_feasible(complete[0]) and not is_feasible(complete[1])


def test_best_prints_the_feasible_non_dominated_trials(pareto, no_model):
    study = pareto.study()
    feasible = [t for t in study.trials if is_feasible(t)]
    point = {t.number: (t.user_attrs["speedup"], 1 - t.user_attrs["ssim"]) for t in feasible}
    expected = {n for n in point if not any(_dominates(point[m], point[n]) for m in point if m != n)}
    code, out, err = run_cli(["best", "--storage", pareto.storage])
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"{pareto.study_name}: feasible Pareto front ({len(expected)} trial")
    shown = [int(line.split()[0][1:]) for line in lines[1:] if line.strip().startswith("#")]
    assert set(shown) == expected and len(shown) == len(expected)
    fastest = max(feasible, key=lambda t: t.user_attrs["speedup"])
    assert lines[-1].strip() == f"fastest feasible (generate's default): #{fastest.number} {fastest.user_attrs['config']}"
    # --json: the same front and the same single pick; search_params.json has them under the pareto key
    code, out, err = run_cli(["best", "--storage", pareto.storage, "--json"])
    data = json.loads(out)
    assert {e["trial"] for e in data["front"]} == expected and data["best"]["trial"] == fastest.number
    key = params_file.search_params_key(*goal_opts(max_loss=0.37, mode="pareto", loss_metric="ssim"))
    assert key == "tiny:ddim:8:pareto:ssim0.37"
    entry = json.loads(open(pareto.output).read())[key]
    assert entry["trial"] == fastest.number and [e["trial"] for e in entry["front"]] == [e["trial"] for e in data["front"]]
    assert entry["mode"] == "pareto" and entry["loss_metric"] == "ssim"


def test_generate_uses_the_fastest_feasible_trial_of_a_pareto_study(pareto, tmp_path):
    study = pareto.study()
    fastest = best_feasible(study, Goal("pareto", None, 0.37, "ssim"))
    code, out, err = run_cli(["generate", "--storage", pareto.storage, "a red fox", "-o", tmp_path / "fox.png"])
    assert code == 0, err
    assert f"trial #{fastest.number}: {fastest.user_attrs['config']}" in out
    assert (tmp_path / "fox.png").is_file()


def test_report_of_a_pareto_study_shows_the_image_grid(pareto, tmp_path):
    from optimize.app import report

    study = pareto.study()
    goal = goal_of(study)
    out = tmp_path / "r.html"
    code, stdout, err = run_cli(["report", "--storage", pareto.storage, "-o", out])
    assert code == 0, err
    page = out.read_text()
    columns = report.image_grid(study, goal, pareto.storage)
    grid = report.grid_trials(study, goal)
    assert [c["title"] for c in columns] == ["baseline"] + [
        f"{'best' if i == 0 else 'Pareto'} #{t.number}" for i, t in enumerate(grid)]
    assert grid[0].number == best_feasible(study, goal).number
    front = {t.number for t in pareto_front([t for t in study.trials if is_feasible(t)], goal)}
    assert {t.number for t in grid} <= front
    # every cell an embedded PNG: baseline and trials, 2 prompts each
    assert page.count('<img class="grid" src="data:image/png;base64,') == 2 * len(columns)
    assert 'id="no-images"' not in page
    assert "feasible Pareto front" in page
    assert "<th>PSNR</th><th>SSIM</th>" in page  # the top trials show their fidelity
