"""Trusting the winner (docs/trust.md): per-prompt scores, paired intervals on every loss and on the
speedup, ``--confidence`` (constraints on the conservative ends), held-out re-validation after a run
and ``optimize-sd validate``.

The statistics and the constraint rule are checked on synthetic data (no model); one small search
(3 trials, 2 prompts, 2 held-out prompts) is shared by the end-to-end checks, and the
``validate`` command runs on its study.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

try:
    from helpers import _distributions, goal_opts, one_error_line, run_args, run_cli, storage_url, synthetic_study
except ImportError:  # tests/ made a package
    from tests.helpers import _distributions, goal_opts, one_error_line, run_args, run_cli, storage_url, synthetic_study

from optimize.app import params_file

from optimize.measure import prompts

from optimize.app import report

from optimize.app import runner

from optimize.measure import uncertainty

from optimize.app import validation
from optimize.levers import Config, Context, DeepCache, ToMe
from optimize.study.baseline import Baseline
from optimize.app.console import format_best, trial_line, validation_text
from optimize.measure.evaluator import Measurement, Timing
from optimize.search import Objective, SearchSpace
from optimize.study.record import (CONSTRAINTS_ATTR, INTERVALS, PER_PROMPT, SCORE_LOSS, SPEEDUP, STUDY_ATTR, VALIDATION,
                            Goal, StudyRecord, Validation, best_feasible, is_feasible)

LEVEL = 0.9


# --- 1. the statistics, on synthetic data ---------------------------------------------------------------

def _width(interval):
    return interval[1] - interval[0]


def test_mean_interval_contains_the_mean_and_shrinks_with_more_values():
    rng = np.random.default_rng(0)
    values = rng.normal(0.9, 0.05, 256)
    few, many = uncertainty.mean_interval(values[:8], LEVEL), uncertainty.mean_interval(values, LEVEL)
    assert few[0] < values[:8].mean() < few[1] and many[0] < values.mean() < many[1]
    assert _width(many) < _width(few) / 3  # ~ 1/sqrt(n): 32x the values, about 1/6 the width
    assert uncertainty.mean_interval([0.5], LEVEL) is None  # one value: no interval, not a zero-width one
    # a higher level is a wider interval
    assert _width(uncertainty.mean_interval(values[:8], 0.99)) > _width(few)


def test_score_loss_interval_is_paired_contains_the_loss_and_shrinks():
    """Prompts differ a lot (scores 20..40), the configuration costs each about 1%: pairing cancels the
    prompts' differences, so the interval is much narrower than the spread of the scores suggests."""
    rng = np.random.default_rng(1)
    base = rng.uniform(20, 40, 64)
    scores = base * 0.99 + rng.normal(0, 0.1, 64)
    loss = 1 - scores.mean() / base.mean()
    lo, hi = uncertainty.score_loss_interval(base, scores, LEVEL)
    assert lo < loss < hi and lo > 0  # surely a loss, however different the prompts are
    unpaired_se = np.hypot(base.std(ddof=1), scores.std(ddof=1)) / np.sqrt(64) / base.mean()
    assert hi - lo < unpaired_se  # far below what an unpaired comparison could resolve
    lo8, hi8 = uncertainty.score_loss_interval(base[:8], scores[:8], LEVEL)
    assert hi8 - lo8 > 2 * (hi - lo)
    assert uncertainty.score_loss_interval(base[:1], scores[:1], LEVEL) is None
    assert uncertainty.score_loss_interval(base[:3], scores[:2], LEVEL) is None  # not paired


def test_score_loss_interval_covers_the_true_loss_at_its_level():
    """400 synthetic studies of 16 prompts with a true loss of 1%: the 90% interval holds it ~90% of the time."""
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(400):
        base = rng.normal(30, 3, 16)
        scores = base * 0.99 + rng.normal(0, 0.3, 16)
        lo, hi = uncertainty.score_loss_interval(base, scores, LEVEL)
        hits += lo <= 0.01 <= hi
    assert 0.84 <= hits / 400 <= 0.96


def test_speedup_interval_from_paired_rounds_and_from_unpaired_calls():
    rng = np.random.default_rng(3)
    drift = rng.uniform(0.9, 1.3, 10)  # the machine's speed drifts between rounds, both sides alike
    base, timed = 1.0 * drift, 0.5 * drift * rng.normal(1, 0.01, 10)
    lo, hi = uncertainty.speedup_interval(2.0, timed, base, True, LEVEL)
    assert lo < 2.0 < hi and hi / lo < 1.05  # pairing cancels the drift
    ulo, uhi = uncertainty.speedup_interval(2.0, timed, base, False, LEVEL)
    assert ulo < 2.0 < uhi and uhi / ulo - 1 > 5 * (hi / lo - 1)  # unpaired, the drift is noise
    assert uncertainty.speedup_interval(2.0, [0.5, 0.5], [1.0, 1.0], True, LEVEL) == (2.0, 2.0)
    assert uncertainty.speedup_interval(2.0, [0.5], [1.0], True, LEVEL) is None
    assert uncertainty.speedup_interval(2.0, [0.5, 0.6], [1.0, 1.0, 1.1], True, LEVEL) is None  # not paired


# --- 2. --confidence: constraints on the conservative ends ----------------------------------------------

def _attrs(speedup, loss, loss_interval, speedup_interval, **extra):
    return {SPEEDUP: speedup, SCORE_LOSS: loss, **extra,
            INTERVALS: {"level": LEVEL, "n": 8, SCORE_LOSS: loss_interval, SPEEDUP: speedup_interval}}


def test_a_trial_within_the_bound_on_its_point_estimate_but_not_its_upper_end_is_infeasible_with_confidence():
    attrs = _attrs(2.1, 0.015, [0.005, 0.025], [1.9, 2.3])
    assert all(c <= 0 for c in Goal("max", None, 0.02).constraints_of(attrs))
    assert Goal("max", None, 0.02, confidence=LEVEL).constraints_of(attrs) == pytest.approx([0.005])
    # target mode: the speedup's lower end decides too
    assert Goal("target", 2.0, 0.05).constraints_of(attrs) == pytest.approx([-0.1, -0.035])
    assert Goal("target", 2.0, 0.05, confidence=LEVEL).constraints_of(attrs) == pytest.approx([0.1, -0.025])
    # a fidelity bound: intervals are stored in the metric's units and turned into the loss's
    psnr = {**attrs, "psnr": 30.0, INTERVALS: {**attrs[INTERVALS], "psnr": [27.0, 33.0]}}
    assert Goal("max", None, 28.0, "psnr").constraints_of(psnr) == pytest.approx([-2.0])
    assert Goal("max", None, 28.0, "psnr", LEVEL).constraints_of(psnr) == pytest.approx([1.0])
    ssim = {**attrs, "ssim": 0.9, INTERVALS: {**attrs[INTERVALS], "ssim": [0.82, 0.98]}}
    assert Goal("max", None, 0.15, "ssim", LEVEL).loss_interval(ssim) == pytest.approx((0.02, 0.18))
    with pytest.raises(ValueError, match="interval"):  # no interval: never a guess
        Goal("max", None, 0.02, confidence=LEVEL).constraints_of({SPEEDUP: 2.0, SCORE_LOSS: 0.01})


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.2])
def test_goal_refuses_a_confidence_outside_0_1(confidence):
    with pytest.raises(ValueError, match="--confidence"):
        Goal("max", None, 0.02, confidence=confidence)


def test_confidence_is_part_of_the_stored_goal_the_name_and_the_key():
    plain, sure = Goal("max", None, 0.02), Goal("max", None, 0.02, confidence=LEVEL)
    assert "confidence" not in plain.as_dict()  # studies without it keep their stored form
    record = StudyRecord(sure, prompt_source="builtin")
    study = type("FakeStudy", (), {"user_attrs": {STUDY_ATTR: record.as_dict()}})()
    assert StudyRecord.load(study) == record
    assert plain.slug == "max-loss0.02" and sure.slug == "max-loss0.02-c0.9"
    spec, opts = goal_opts()
    opts.goal = sure
    assert params_file.search_params_key(spec, opts) == "tiny:ddim:8:max:0.02:c0.9"
    assert runner.study_name_for(spec, opts).endswith("-c0.9")


class _FakeEvaluator:
    """Hands out one made-up measurement: paired rounds 0.5 s vs 1.0 s per image, the given scores."""

    repeats = 0

    def __init__(self, scores):
        self.scores = np.asarray(scores, dtype=float)

    def measure(self, config, gate=None):
        return Measurement(config, Timing.from_samples([0.50, 0.51, 0.49]), self.scores, [],
                           Timing.from_samples([1.0, 1.01, 0.99]))


def test_the_objective_stores_per_prompt_scores_intervals_and_decides_on_the_upper_end(tmp_path):
    base = [30.0, 20.0, 31.0, 21.0]
    scores = [29.8, 19.2, 30.9, 20.9]
    loss = 1 - np.mean(scores) / np.mean(base)
    lo, hi = uncertainty.score_loss_interval(base, scores, LEVEL)
    bound = (loss + hi) / 2  # the point estimate is within it, the upper end is not
    baseline = Baseline(1.0, 0.0, float(np.mean(base)), base, {}, 32, 32, [1.0, 1.0])
    feasible = {}
    for confidence in (None, LEVEL):
        goal = Goal("max", None, bound, confidence=confidence)
        study = optuna.create_study(direction="maximize")
        objective = Objective(_FakeEvaluator(scores), baseline, goal, SearchSpace(("deepcache",), Context(steps=8, max_branch_id=3)))
        study.optimize(objective, n_trials=1)
        (t,) = study.trials
        assert t.state == TrialState.COMPLETE
        assert t.system_attrs[PER_PROMPT] == {"clip_score": pytest.approx(scores)}
        assert t.user_attrs[INTERVALS][SCORE_LOSS] == pytest.approx([lo, hi])
        assert t.user_attrs[INTERVALS]["level"] == LEVEL and t.user_attrs[INTERVALS]["n"] == 4
        s_lo, s_hi = t.user_attrs[INTERVALS][SPEEDUP]
        assert s_lo < t.user_attrs[SPEEDUP] < s_hi
        feasible[confidence] = is_feasible(t)
        assert t.system_attrs[CONSTRAINTS_ATTR] == pytest.approx([(hi if confidence else loss) - bound])
    assert feasible == {None: True, LEVEL: False}


# --- 3. held-out prompts and the validation's size -------------------------------------------------------

def test_heldout_prompts_come_after_the_search_prompts_and_never_repeat_one(tmp_path):
    search = prompts.load_prompts("builtin", 8)
    held = prompts.load_heldout("builtin", 8, 4)
    assert len(held) == 4 and not set(held) & set(search)
    assert held == prompts.load_prompts("builtin", 12)[8:]
    f = tmp_path / "p.txt"
    f.write_text("a\nb\nc\na\nb\nd\nd\ne\n")  # repeats of search prompts and of held-out ones are left out
    assert prompts.load_heldout(str(f), 3, 2) == ["d", "e"]
    with pytest.raises(prompts.PromptsError, match="--validate 3") as e:
        prompts.load_heldout(str(f), 3, 3)
    assert "\n" not in str(e.value)
    with pytest.raises(prompts.PromptsError, match="builtin"):
        prompts.load_heldout("builtin", 70, 4)  # 72 built-in captions


def test_default_validation_size_stays_within_its_share_of_the_study():
    assert validation.default_size(8) == 8 and validation.default_size(32) == 8
    assert validation.planned_size(None, 32, 20, 10) == (8, None)  # a GPU study: 36 of 1040 calls
    n, note = validation.planned_size(None, 2, 4, 0)  # the tests' tiny runs: 8 of 8 calls
    assert n == 0 and "skipped" in note and "--validate 8" in note
    assert validation.planned_size(3, 2, 4, 0) == (3, None)  # asked for: run whatever it costs
    assert validation.planned_size(0, 32, 20, 10) == (0, None)


# --- 4. what is shown: lines, search_params.json, report -------------------------------------------------

def _validation(within: bool, **kw) -> Validation:
    base = dict(n=4, seed=1042, prompts="h", level=LEVEL, loss_metric="clip", loss=0.03, loss_interval=[0.021, 0.039],
                speedup=1.9, speedup_interval=[1.8, 2.0], within_bound=within,
                failed=[] if within else ["score_loss <= 0.02"], measured={SCORE_LOSS: 0.03},
                per_prompt={"clip_score": [1.0] * 4}, baseline_per_prompt={"clip_score": [1.0] * 4},
                device="cpu", time="2026-01-01T00:00:00+00:00")
    return Validation(**{**base, **kw})


def test_validation_line_flags_a_broken_bound():
    goal = Goal("max", None, 0.02)
    broken = validation_text(goal, _validation(False))
    assert "score_loss +0.0300 [+0.0210, +0.0390]" in broken and "1.90x [1.80, 2.00]" in broken
    assert "BREAKS score_loss <= 0.02 out of sample" in broken and "\n" not in broken
    assert validation_text(goal, _validation(True)).endswith("within the bound")


def test_validator_verdict_follows_the_study_rule():
    v = validation.Validator.__new__(validation.Validator)
    attrs = _attrs(2.1, 0.015, [0.005, 0.025], [1.9, 2.3])
    v.goal = Goal("target", 2.0, 0.02)
    assert v._verdict(attrs) == []
    v.goal = Goal("target", 2.0, 0.02, confidence=LEVEL)
    assert v._verdict(attrs) == ["speedup >= 2x", "score_loss <= 0.02"]


def _synthetic(tmp_path, held_out: Validation | None = None):
    """Three trials, #0 (the fastest feasible one) validated with ``held_out`` (default: breaks the bound),
    #1 infeasible, #2 feasible and slower."""
    goal = Goal("max", None, 0.02)
    trials = [(Config(deepcache=DeepCache(3, 0)), 2.0, 0.010,
               {INTERVALS: {"level": LEVEL, "n": 4, SCORE_LOSS: [0.004, 0.016], SPEEDUP: [1.9, 2.1]}}),
              (Config(deepcache=DeepCache(5, 0)), 2.5, 0.030),
              (Config(deepcache=DeepCache(2, 0)), 1.6, 0.005)]
    study = synthetic_study(f"sqlite:///{tmp_path / 's.db'}", "synth", goal, trials)
    from optimize.study.storage import set_trial_system_attr_after

    held_out = _validation(False) if held_out is None else held_out
    set_trial_system_attr_after(study._storage, study.trials[0]._trial_id, VALIDATION, held_out.as_dict())
    return goal, validation.reloaded(study)


def test_a_pick_that_breaks_the_bound_out_of_sample_is_passed_over(tmp_path):
    """Its search numbers flattered it: best, the front and the report's pick go to the next best."""
    from optimize.study.record import feasible_front, study_result

    goal, study = _synthetic(tmp_path)
    assert Validation.of(study.trials[0]) == _validation(False)  # stored on a completed trial
    assert best_feasible(study, goal).number == 2
    assert [t.number for t in feasible_front(study, Goal("pareto", None, 0.02))] == [2]
    assert study_result(study, Goal("pareto", None, 0.02))[0].number == 2
    page = report.build_report_html(study)
    assert "breaks the bound (4 prompts)" in page  # #0 in the table's held-out column, still shown
    (tmp_path / "held").mkdir()
    goal, study = _synthetic(tmp_path / "held", _validation(True, loss=0.01, failed=[]))
    assert best_feasible(study, goal).number == 0  # held: it stays the pick


def test_report_shows_intervals_and_flags_a_pick_whose_speedup_did_not_reproduce(tmp_path):
    (tmp_path / "x").mkdir()
    goal, study = _synthetic(tmp_path / "x", _validation(True, loss=0.01, failed=[], speedup_reproduced=False,
                                                          search_speedup_interval=[1.9, 2.1]))
    best = best_feasible(study, goal)
    assert best.number == 0
    page = report.build_report_html(study)
    assert 'id="validation-flag"' in page and "NOT REPRODUCED" in page
    assert "score_loss +0.0100 [+0.0040, +0.0160]" in page and "2.000x [1.90, 2.10]" in page
    fig = report.pareto_figure(study, goal)
    feasible = next(t for t in fig.data if (t.name or "").startswith("feasible"))
    assert list(feasible.error_x.array)[0] == pytest.approx(0.006) and list(feasible.error_y.arrayminus)[0] == pytest.approx(0.1)


def test_trial_line_and_entry_carry_the_intervals(tmp_path):
    goal, study = _synthetic(tmp_path)
    trial = study.trials[0]
    line = trial_line(trial, goal)
    assert "2.00x [1.90, 2.10]" in line and "score_loss +0.0100 [+0.0040, +0.0160]" in line
    entry = params_file.trial_entry(trial, goal)
    assert entry["loss_interval"] == [0.004, 0.016] and entry["speedup_interval"] == [1.9, 2.1]
    assert entry["interval_level"] == LEVEL and entry["confidence"] is None
    assert entry["validation"] == _validation(False).summary() and "per_prompt" not in entry["validation"]


def test_update_pick_puts_the_study_s_pick_in_its_entries(tmp_path):
    goal, study = _synthetic(tmp_path)
    path = tmp_path / "sp.json"
    rejected = {"study": "synth", "trial": 0, "params": {"deepcache": True}, "config": "dc(3,b0)", "model": "tiny",
                "steps": 8, "loss_interval": [0.004, 0.016], "validation": _validation(False).summary()}
    data = {"a": rejected, "b": {**rejected, "study": "other"}, "c": {**rejected, "trial": 2, "params": {}}}
    path.write_text(json.dumps(data))
    best = best_feasible(study, goal)
    assert params_file.update_pick(str(path), "synth", best, [], goal) == ["a"]
    after = json.loads(path.read_text())
    assert after["a"]["trial"] == 2 and after["a"]["params"] == dict(best.params)
    assert after["a"]["config"] == best.user_attrs["config"] and after["a"]["speedup"] == 1.6
    assert after["a"]["model"] == "tiny" and after["a"]["steps"] == 8  # the settings it was found with stay
    assert "validation" not in after["a"] and "loss_interval" not in after["a"]  # #2 has neither
    assert after["b"] == data["b"] and after["c"] == data["c"]  # another study's; already the pick
    assert params_file.update_pick(str(path), "synth", None, [], goal) == []
    # no pick left: the entries of the study holding a passed-over trial go, nothing else
    assert params_file.drop_passed_over(str(path), "synth", {2}) == ["a", "c"]
    assert json.loads(path.read_text()) == {"b": data["b"]}
    assert params_file.drop_passed_over(str(path), "synth", set()) == []


class _Verdicts(validation.Validator):
    """A Validator without a model whose verdicts are given: ``broken`` trial numbers break the bound."""

    def __init__(self, goal, broken):
        self.goal, self.broken, self.measured = goal, set(broken), []
        self.prompts, self.settings = ["a", "b", "c", "d"], type("S", (), {"seed": 1042})()

    def done(self, trial):
        return None

    def measure(self, trial):
        self.measured.append(trial.number)
        return _validation(trial.number not in self.broken, loss=0.03 if trial.number in self.broken else 0.01)


@pytest.mark.parametrize("broken,measured,pick", [
    ((), [0], 0),  # the pick holds: nothing else measured
    ((0,), [0, 2], 2),  # the next best in its place
    ((0, 2, 3), [0, 2, 3], 4),  # three in all at most: the fourth is the pick, not validated, said so
    ((0, 2, 3, 4), [0, 2, 3], 4),
])
def test_validate_pick_goes_down_the_ranking_while_a_pick_breaks_the_bound(tmp_path, broken, measured, pick):
    goal = Goal("max", None, 0.02)
    trials = [(Config(deepcache=DeepCache(3, 0)), 2.0, 0.010), (Config(deepcache=DeepCache(5, 0)), 2.5, 0.030),
              (Config(deepcache=DeepCache(2, 0)), 1.6, 0.005), (Config(deepcache=DeepCache(2, 1)), 1.5, 0.005),
              (Config(deepcache=DeepCache(2, 2)), 1.4, 0.005)]
    study = synthetic_study(f"sqlite:///{tmp_path / 's.db'}", "synth", goal, trials)
    lines = []
    validator = _Verdicts(goal, broken)
    study, done = validation.validate_pick(study, goal, validator, lambda line, err=False: lines.append((line, err)))
    assert validator.measured == measured and list(done) == measured
    assert best_feasible(study, goal).number == pick
    assert all(Validation.of(study.trials[n]).within_bound == (n not in broken) for n in measured)
    text = "\n".join(line for line, _ in lines)
    if len(measured) > 1:
        assert "#0 is no longer the pick; the next best is #2" in text
    if len(measured) == 3:
        assert any(err and line.startswith("optimize-sd: warning: the pick is now #4, not validated: the 3 best broke "
                                           "the bound out of sample") for line, err in lines), lines


def test_add_validations_updates_only_the_entries_holding_those_trials(tmp_path):
    path = tmp_path / "sp.json"
    data = {"a": {"study": "s", "trial": 3, "params": {}, "front": [{"trial": 1}, {"trial": 3}]},
            "b": {"study": "s", "trial": 5, "params": {}}, "c": {"study": "other", "trial": 3, "params": {}}}
    path.write_text(json.dumps(data))
    assert params_file.add_validations(str(path), "s", {3: {"n": 4}}) == ["a"]
    after = json.loads(path.read_text())
    assert after["a"]["validation"] == {"n": 4} and after["a"]["front"][1]["validation"] == {"n": 4}
    assert "validation" not in after["a"]["front"][0] and after["b"] == data["b"] and after["c"] == data["c"]
    assert params_file.add_validations(str(tmp_path / "missing.json"), "s", {3: {}}) == []
    assert not (tmp_path / "missing.json").exists()


class _HeldOutEvaluator:
    """A Validator's evaluator without a model: the untouched pipeline's held-out pass, then the pick in
    paired rounds that measure ``speedup`` (whole calls), with CLIP scores ``factor`` times the baseline's."""

    repeats, scored_repeats = 2, 6

    def __init__(self, speedup: float, factor: float = 0.999):
        self.speedup, self.factor = speedup, factor
        self.base = np.array([30.0, 31.0, 29.0, 30.5])

    def measure(self, config, gate=None, paired=True):
        if not paired:
            return Measurement(config, Timing.from_samples([1.0] * 3), self.base, [])
        rounds = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0]
        return Measurement(config, Timing.from_samples([r / self.speedup for r in rounds]),
                           self.base * self.factor, [], Timing.from_samples(rounds))

    def close(self):
        pass


@pytest.mark.parametrize("speedup,factor,reproduced,bound", [
    (3.94, 0.999, False, True),  # the pick: 10.02x in the search, 3.94x held out
    (10.0, 0.999, True, True),  # inside the search's interval: it stands
    (3.94, 0.9, False, False),  # not reproduced and out of the bound: still one line
])
def test_a_heldout_speedup_outside_the_picks_interval_is_one_warning_and_marks_the_pick(
        tmp_path, speedup, factor, reproduced, bound):
    from types import SimpleNamespace

    from optimize.app.console import format_best
    from optimize.measure import GenerationSettings
    from optimize.app.params_file import best_json, run_entry

    goal = Goal("max", None, 0.02)
    interval = {INTERVALS: {"level": LEVEL, "n": 8, SCORE_LOSS: [0.0, 0.02], SPEEDUP: [9.0, 11.2]}}
    study = synthetic_study(f"sqlite:///{tmp_path / 's.db'}", "synth", goal,
                            [(Config(deepcache=DeepCache(5, 0)), 10.02, 0.01, interval)])
    pick = best_feasible(study, goal)
    settings = GenerationSettings(steps=8, guidance=7.5, height=64, width=64)
    validator = validation.Validator(None, None, ["a", "b", "c", "d"], settings, goal, "cpu")
    validator.evaluator = _HeldOutEvaluator(speedup, factor)
    validator._base = validator.evaluator.measure(Config(), paired=False)
    validator._fidelity = SimpleNamespace(per_image=lambda images: {})
    lines = []
    (v,) = validation.validate_trials(study, [pick], validator, lambda line, err=False: lines.append((line, err))).values()
    warnings = [line for line, err in lines if err]
    assert v.speedup == pytest.approx(speedup) and v.within_bound == bound
    assert v.speedup_reproduced is reproduced and v.search_speedup_interval == [9.0, 11.2]
    # the trial's validation attr, search_params.json's entry, best --json and the summary all say so
    pick = best_feasible(validation.reloaded(study), goal)
    if not bound:  # broken out of sample: no pick any more; its entry would still say why
        assert pick is None
        pick = validation.reloaded(study).trials[0]
    assert Validation.of(pick).speedup_reproduced is reproduced
    opts = SimpleNamespace(goal=goal, scheduler="ddim", steps=8, batch_size=1, dtype="fp32", exec_mode="eager",
                           storage="sqlite:///s.db")
    baseline = Baseline.load(study)
    entry = run_entry(pick, [], spec=SimpleNamespace(name="tiny", source="tiny"), opts=opts, settings=settings,
                      device="cpu", study_name="synth", baseline=baseline)
    assert entry["speedup_reproduced"] is reproduced and entry["validation"]["speedup_reproduced"] is reproduced
    assert best_json("synth", goal, pick, [], baseline)["best"]["speedup_reproduced"] is reproduced
    speedup_line = format_best("synth", goal, pick, baseline).splitlines()[1]
    if reproduced:
        assert warnings == [] and "not reproduced" not in speedup_line
    else:
        assert len(warnings) == 1 and "NOT REPRODUCED" in warnings[0] and "[9.00, 11.20]" in warnings[0]
        assert warnings[0].startswith("optimize-sd: warning: #0 ") and "\n" not in warnings[0]
        assert f"10.02x [9.00, 11.20] not reproduced (held-out {speedup:.2f}x)" in speedup_line
    assert any("BREAKS score_loss" in w for w in warnings) == (not bound)


# --- 5. bad input: one line, nothing loaded --------------------------------------------------------------

@pytest.mark.parametrize("extra,needle", [
    (["--confidence", "1.5"], "--confidence"),
    (["--confidence", "0"], "--confidence"),
    (["--confidence", "0.9", "--num-samples", "1"], "2 prompts"),
    (["--confidence", "0.9", "--target-speedup", "1.5", "--repeats", "1", "--scored-repeats", "1"], "paired rounds"),
    (["--repeats", "0"], "--repeats"),  # every speedup is a paired ratio: no unpaired timing to fall back on
    (["--validate", "400"], "--validate 400"),
    (["--prompts", "{tmp}/three.txt", "--validate", "2"], "three.txt"),
])
def test_bad_trust_options_are_one_line_and_load_nothing(extra, needle, tmp_path, monkeypatch, no_model):
    (tmp_path / "three.txt").write_text("a red fox\na blue car\na green tree\n")
    monkeypatch.chdir(tmp_path)
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    line = one_error_line(*run_cli(run_args(tmp_path, "--n-trials", "1", *extra)))
    assert needle in line, line
    assert not (tmp_path / "s.db").exists()


def test_workers_leave_the_validation_to_the_launcher():
    from optimize.app import cli

    o = cli.run.make_context("run", ["--pipe", "tiny", "--confidence", "0.9", "--validate", "3"]).params
    argv = cli.worker_argv(o, "cpu", 2, 1)
    assert argv[argv.index("--confidence") + 1] == "0.9"
    assert argv.count("--validate") == 1 and argv[argv.index("--validate") + 1] == "0"


# --- 6. end to end: a run with --confidence and --validate, then optimize-sd validate -----------------------

@pytest.fixture(scope="module")
def trusted(tmp_path_factory):
    """3 trials on 2 prompts, --confidence 0.9, the pick validated on 2 held-out prompts; the prompts and
    first seed of every Evaluator made are recorded. The bound is wide enough for DeepCache, whose loss
    interval over 2 prompts spans about +-0.7: the pick must be faster than the baseline."""
    from optimize.measure import evaluator as measure

    directory = tmp_path_factory.mktemp("trusted")
    made = []
    original = measure.Evaluator.__init__

    def record(self, pipe, scorer, prompts, settings, *args, **kwargs):
        made.append((tuple(prompts), settings.seed))
        original(self, pipe, scorer, prompts, settings, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(measure.Evaluator, "__init__", record)
        mp.chdir(directory)
        code, out, err = run_cli(run_args(directory, "--max-loss", "0.8", "--n-trials", "3", "--confidence", "0.9",
                                          "--validate", "2"))
    assert code == 0, out + err
    name = "tiny-ddim-8steps-max-loss0.8-c0.9"
    study = optuna.load_study(study_name=name, storage=storage_url(directory))
    return {"dir": directory, "out": out, "err": err, "made": made, "name": name, "storage": storage_url(directory),
            "output": os.path.join(directory, "search_params.json"), "study": study}


def test_every_trial_stores_per_prompt_scores_and_intervals_around_its_numbers(trusted):
    study = trusted["study"]
    assert study.user_attrs[STUDY_ATTR]["goal"]["confidence"] == LEVEL
    assert study.user_attrs[STUDY_ATTR]["prompt_source"] == "testbed"  # builtin means the testbed's held-out captions for tiny
    assert len(study.user_attrs["baseline"]["scores"]) == 2  # the baseline's per-prompt CLIP scores
    goal = StudyRecord.load(study).goal
    trials = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(trials) == 3
    for t in trials:
        a, per = t.user_attrs, t.system_attrs[PER_PROMPT]
        assert set(per) >= {"clip_score", "psnr", "ssim"} and all(len(v) == 2 for v in per.values())
        assert np.mean(per["clip_score"]) == pytest.approx(a["clip_score"], abs=1e-5)
        for k in ("psnr", "ssim"):
            assert np.mean(per[k]) == pytest.approx(a[k], abs=1e-5)
            lo, hi = a[INTERVALS][k]
            assert lo <= a[k] <= hi
        s_lo, s_hi = a[INTERVALS][SPEEDUP]
        assert s_lo <= a[SPEEDUP] <= s_hi
        lo, hi = a[INTERVALS][SCORE_LOSS]
        assert lo <= a[SCORE_LOSS] <= hi
        assert t.system_attrs[CONSTRAINTS_ATTR] == pytest.approx([hi - 0.8])  # decided on the upper end
        assert f"score_loss {a[SCORE_LOSS]:+.4f} [{lo:+.4f}, {hi:+.4f}]" in trusted["out"]  # its trial line
    assert goal.confidence == LEVEL


def test_the_pick_is_validated_on_prompts_and_seeds_the_search_never_used(trusted):
    study = trusted["study"]
    search_prompts, search_seed = trusted["made"][0]
    held = [(p, s) for p, s in trusted["made"] if s != search_seed]
    assert held and all(s == 42 + validation.SEED_OFFSET for _, s in held)
    (held_prompts,) = {p for p, _ in held}
    assert not set(held_prompts) & set(search_prompts) and len(held_prompts) == 2
    best = best_feasible(study, StudyRecord.load(study).goal)
    v = Validation.of(best)
    assert (v.n, v.seed, v.prompts) == (2, 1042, prompts.prompts_hash(list(held_prompts)))
    assert len(v.per_prompt["clip_score"]) == len(v.baseline_per_prompt["clip_score"]) == 2
    assert v.loss_interval[0] <= v.loss <= v.loss_interval[1] and v.within_bound == (v.loss_interval[1] <= 0.8)
    assert f"validating #{best.number} " in trusted["out"] and "held-out (2 prompts, seed 1042)" in trusted["out"]


def test_search_params_and_best_carry_intervals_and_the_validation(trusted, no_model):
    study = trusted["study"]
    best = best_feasible(study, StudyRecord.load(study).goal)
    entry = json.load(open(trusted["output"]))["tiny:ddim:8:max:0.8:c0.9"]
    assert entry["trial"] == best.number and entry["confidence"] == LEVEL and entry["interval_level"] == LEVEL
    assert entry["loss_interval"] == best.user_attrs[INTERVALS][SCORE_LOSS]
    assert entry["speedup_interval"] == best.user_attrs[INTERVALS][SPEEDUP]
    assert entry["validation"] == Validation.of(best).summary()
    code, out, err = run_cli(["best", "--storage", trusted["storage"]])
    assert code == 0, err
    assert "90% paired intervals over 2 prompts; constraints on the conservative ends (--confidence 0.9)" in out
    assert "held-out (2 prompts, seed 1042)" in out
    code, out, err = run_cli(["best", "--storage", trusted["storage"], "--json"])
    data = json.loads(out)
    assert data["goal"]["confidence"] == LEVEL and data["best"]["validation"]["n"] == 2


def test_a_resumed_study_with_another_confidence_is_refused(trusted, tmp_path, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    before = len(trusted["study"].trials)
    for extra in (["--confidence", "0.8"], []):  # another level, or none: the stored rule stands
        argv = run_args(trusted["dir"], "--max-loss", "0.8", "--n-trials", "1", "--study", trusted["name"], *extra)
        line = one_error_line(*run_cli(argv))
        assert "'confidence': 0.9" in line and "use another --study" in line
    assert len(optuna.load_study(study_name=trusted["name"], storage=trusted["storage"]).trials) == before


def test_validate_command_stores_the_attr_and_updates_the_entry(trusted, monkeypatch):
    monkeypatch.chdir(trusted["dir"])
    storage, output = trusted["storage"], trusted["output"]
    goal = StudyRecord.load(trusted["study"]).goal
    pick = best_feasible(trusted["study"], goal).number
    other = next(t.number for t in trusted["study"].trials if t.number != pick and t.state == TrialState.COMPLETE)
    before = open(output).read()
    code, out, err = run_cli(["validate", "--storage", storage, "--trial", other, "-n", "3", "--output", output])
    # exit 1 only for a held-out result that failed (a CPU speedup may land outside its interval: a timing)
    assert code == (1 if "NOT REPRODUCED" in out or "BREAKS" in out else 0), out + err
    assert f"validating #{other} " in out and "held-out (3 prompts, seed 1042)" in out
    study = optuna.load_study(study_name=trusted["name"], storage=storage)
    assert Validation.of(study.trials[other]).n == 3
    if Validation.of(study.trials[other]).within_bound:
        assert open(output).read() == before  # the file holds the pick, not this trial
    code, out, err = run_cli(["validate", "--storage", storage, "-n", "3", "--output", output])
    study = optuna.load_study(study_name=trusted["name"], storage=storage)
    # the pick in the end: validated on these 3 prompts (a later validation replaces an earlier one's verdict)
    pick = best_feasible(study, goal)
    last = Validation.of(pick)
    assert last.n == 3 and f"#{pick.number} " in out
    assert code == (0 if last.within_bound and last.speedup_reproduced is not False else 1), out + err
    assert f"added to {output} under 'tiny:ddim:8:max:0.8:c0.9'" in out
    entry = json.load(open(output))["tiny:ddim:8:max:0.8:c0.9"]
    assert entry["trial"] == pick.number and entry["validation"]["n"] == 3


def test_after_a_pick_is_passed_over_the_configurations_the_speed_gate_skipped_for_it_are_scored(tmp_path):
    """The gate skipped them for being slower than a pick that then broke the bound out of sample: those
    faster than the next best are scored (fastest first, each configuration once, none scored already)
    until one is feasible."""
    from types import SimpleNamespace

    from optuna.trial import create_trial

    from optimize.app.runner import Search

    goal = Goal("max", None, 0.02)
    study = synthetic_study(f"sqlite:///{tmp_path / 's.db'}", "synth", goal,
                            [(Config(deepcache=DeepCache(3, 0)), 2.0, 0.010), (Config(deepcache=DeepCache(2, 0)), 1.5, 0.005)])
    dists = _distributions()

    def gated(config, speedup):
        params = config.to_params()
        attrs = {"config": config.label(), **({SPEEDUP: speedup} if speedup else {})}
        study.add_trial(create_trial(state=TrialState.PRUNED, params=params,
                                     distributions={k: dists[k] for k in params}, user_attrs=attrs))

    gated(Config(deepcache=DeepCache(4, 1)), 1.8)  # #2
    gated(Config(deepcache=DeepCache(4, 2)), 1.9)  # #3
    gated(Config(deepcache=DeepCache(2, 2)), 1.4)  # #4: slower than the next best
    gated(Config(deepcache=DeepCache(2, 0)), 1.7)  # #5: #1's configuration, scored already
    gated(Config(deepcache=DeepCache(4, 2)), 1.85)  # #6: #3's again
    gated(Config(deepcache=DeepCache(5, 3)), None)  # #7: an invalid draw, nothing measured
    from optimize.study.storage import set_trial_system_attr_after

    set_trial_system_attr_after(study._storage, study.trials[0]._trial_id, VALIDATION, _validation(False).as_dict())
    study = validation.reloaded(study)

    search = Search.__new__(Search)
    search.opts = SimpleNamespace(goal=goal, speed_gate=True)
    lines, ran = [], []
    search.write = lambda line, err=False: lines.append(line)
    search.evaluator = SimpleNamespace(close=lambda: None)
    search.optimize = lambda n=None: ran.append((n, [t.system_attrs["fixed_params"] for t in search.study.get_trials(
        deepcopy=False, states=(TrialState.WAITING,))]))  # the queue: what the trials would run
    search.rescore_gated(study)  # optimize is a fake here: the queued trials stay infeasible (unscored)
    assert ran == [(1, [study.trials[3].params]), (1, [study.trials[3].params, study.trials[2].params])]
    assert lines[1:] == ["#3 dc(4,b2) (1.90x when skipped)", "#2 dc(4,b1) (1.80x when skipped)"]
    # once one is feasible it is the next best, faster than the rest: no more are scored
    (tmp_path / "b").mkdir()
    study = synthetic_study(f"sqlite:///{tmp_path / 'b' / 's.db'}", "synth", goal,
                            [(Config(deepcache=DeepCache(3, 0)), 2.0, 0.010), (Config(deepcache=DeepCache(2, 0)), 1.5, 0.005)])
    gated(Config(deepcache=DeepCache(4, 1)), 1.8)
    gated(Config(deepcache=DeepCache(4, 2)), 1.9)
    set_trial_system_attr_after(study._storage, study.trials[0]._trial_id, VALIDATION, _validation(False).as_dict())
    study = validation.reloaded(study)

    def feasible_trial(n=None):  # what the queued trial measures: feasible at its speed
        params = search.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))[-1].system_attrs["fixed_params"]
        ran.append(params)
        search.study.add_trial(create_trial(
            state=TrialState.COMPLETE, values=[1.9], params=params, distributions={k: dists[k] for k in params},
            user_attrs={**study.trials[1].user_attrs, "config": "dc(4,b2)", SPEEDUP: 1.9},
            system_attrs={k: v for k, v in study.trials[1].system_attrs.items()}))

    ran.clear()
    search.optimize = feasible_trial
    study = search.rescore_gated(study)
    assert ran == [study.trials[3].params] and best_feasible(study, goal).number == len(study.trials) - 1

    search.opts = SimpleNamespace(goal=Goal("target", 1.5, 0.02), speed_gate=True)  # the gate's bar is the target
    ran.clear()
    search.rescore_gated(study)
    assert ran == []


def test_validate_pick_validates_what_a_rescore_adds(tmp_path):
    goal = Goal("max", None, 0.02)
    trials = [(Config(deepcache=DeepCache(3, 0)), 2.0, 0.010), (Config(deepcache=DeepCache(2, 0)), 1.5, 0.005)]
    study = synthetic_study(f"sqlite:///{tmp_path / 's.db'}", "synth", goal, trials)

    validator, lines = _Verdicts(goal, {0}), []

    def rescore_measured(study):  # as a run's: a configuration the gate skipped, scored now at 1.8x
        from optuna.trial import create_trial

        params = Config(deepcache=DeepCache(4, 1)).to_params()
        dists = _distributions()
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=[1.8], params=params,
                                     distributions={k: dists[k] for k in params},
                                     user_attrs={**study.trials[1].user_attrs, "config": "dc(4,b1)", SPEEDUP: 1.8},
                                     system_attrs={k: v for k, v in study.trials[1].system_attrs.items()
                                                   if k != VALIDATION}))
        return validation.reloaded(study)

    study, done = validation.validate_pick(study, goal, validator, lambda line, err=False: lines.append(line),
                                           rescore=rescore_measured)
    assert validator.measured == [0, 2] and best_feasible(study, goal).number == 2
    assert "#0 is no longer the pick; the next best is #2" in lines


def test_a_run_passes_over_a_pick_that_breaks_the_bound_out_of_sample(tmp_path, monkeypatch):
    """The run's pick breaks the bound on the held-out prompts (forced here): the next best is validated
    and search_params.json, best and the summary carry that one."""
    original, judged = validation.Validator._verdict, []

    def first_breaks(self, attrs):
        judged.append(attrs)
        return ["score_loss <= 0.8"] if len(judged) == 1 else original(self, attrs)

    monkeypatch.setattr(validation.Validator, "_verdict", first_breaks)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(run_args(tmp_path, "--max-loss", "0.8", "--n-trials", "3", "--validate", "2"))
    assert code == 0, out + err
    first, then = (int(n) for n in re.findall(r"validating #(\d+) ", out)[:2])
    assert f"#{first} is no longer the pick; the next best is #{then}" in out
    study = optuna.load_study(study_name="tiny-ddim-8steps-max-loss0.8", storage=storage_url(tmp_path))
    assert Validation.of(study.trials[first]).within_bound is False
    pick = best_feasible(study, StudyRecord.load(study).goal)
    assert pick.number == then and Validation.of(pick).n == 2
    entry = json.load(open(tmp_path / "search_params.json"))["tiny:ddim:8:max:0.8"]
    assert entry["trial"] == then and entry["validation"]["n"] == 2
    assert f"best feasible trial #{then}:" in out


def test_a_run_whose_every_feasible_trial_breaks_the_bound_out_of_sample_leaves_no_result(tmp_path, monkeypatch):
    """The entry written while the trials ran is removed: no file says a passed-over trial is a result."""
    monkeypatch.setattr(validation.Validator, "_verdict", lambda self, attrs: ["score_loss <= 0.8"])
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "search_params.json"
    output.write_text(json.dumps({"other": {"study": "another", "trial": 0, "params": {}}}))
    code, out, err = run_cli(run_args(tmp_path, "--max-loss", "0.8", "--n-trials", "2", "--validate", "2",
                                      "--methods", "deepcache"))
    assert code == 0, out + err
    assert "removed 'tiny:ddim:8:max:0.8' from" in out and "the study has no other" in out
    assert json.loads(output.read_text()) == {"other": {"study": "another", "trial": 0, "params": {}}}
    study = optuna.load_study(study_name="tiny-ddim-8steps-max-loss0.8", storage=storage_url(tmp_path))
    assert best_feasible(study, StudyRecord.load(study).goal) is None
    code, out, err = run_cli(["best", "--storage", storage_url(tmp_path)])
    assert code == 1


def test_validate_again_measures_nothing(trusted, no_model):
    code, out, err = run_cli(["validate", "--storage", trusted["storage"], "-n", "3", "--output", trusted["output"]])
    assert code == (1 if "NOT REPRODUCED" in out or "BREAKS" in out else 0), out + err
    assert "already validated on these 3 held-out prompts" in out


def test_validate_command_errors_are_one_line(trusted, tmp_path, no_model):
    cases = [(["--storage", f"sqlite:///{tmp_path}/none.db"], "no study database"),
             (["--storage", trusted["storage"], "--trial", "99"], "#99"),
             (["--storage", trusted["storage"], "--prompts", str(tmp_path / "p.txt")], "not this study's")]
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(20)))
    for argv, needle in cases:
        line = one_error_line(*run_cli(["validate", *argv]))
        assert needle in line, line


def test_neither_a_configuration_slower_than_the_baseline_nor_the_baseline_itself_is_a_pick(tmp_path):
    # with --confidence few configurations are feasible, and the only one may run slower than the
    # baseline itself (a 0.92x ToMe on the testbed): writing it out as the result would slow users down
    goal = Goal("max", None, 0.02)
    study = synthetic_study(f"sqlite:///{tmp_path / 's.db'}", "slow", goal,
                            [(Config(tome=ToMe(0.25)), 0.92, 0.001), (Config(deepcache=DeepCache(5, 0)), 2.5, 0.030),
                             (Config(), 1.02, 0.0)])  # every lever off: the baseline again, 1x plus noise
    assert [is_feasible(t) for t in study.trials] == [True, False, True]
    assert best_feasible(study, goal) is None
    assert "no feasible trial yet that is faster than the baseline" in format_best("slow", goal, None, None)
