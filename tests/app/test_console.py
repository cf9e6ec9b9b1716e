"""optimize.app.console on its own: the lines a user reads for trials, bounds and results."""

from __future__ import annotations

from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from optimize.app.console import bracket, trial_line
from optimize.study.record import CONSTRAINTS_ATTR, Goal


def _trial(state=TrialState.COMPLETE, **attrs):
    attrs = {"config": "sched(dpm++,20)+dc(3,b0)", **attrs}
    return create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None,
                        params={"deepcache": True}, distributions={"deepcache": CategoricalDistribution([False, True])},
                        user_attrs=attrs, system_attrs={CONSTRAINTS_ATTR: [-0.1, -0.2]})


def test_bracket():
    assert bracket((1.0, 2.5), ".2f") == " [1.00, 2.50]"
    assert bracket(None, ".2f") == ""


def test_a_complete_trial_line_shows_speedup_loss_intervals_and_feasibility():
    t = _trial(speedup=2.1, spread=0.04, score_loss=0.004, psnr=31.2, ssim=0.95,
               intervals={"level": 0.9, "n": 8, "speedup": [2.02, 2.18], "score_loss": [-0.001, 0.009]})
    line = trial_line(t, Goal("max", None, 0.02))
    assert "sched(dpm++,20)+dc(3,b0)   " in line.split("x [")[0]
    assert "2.10x [2.02, 2.18] ±4%" in line and "score_loss +0.0040 [-0.0010, +0.0090]" in line
    assert "psnr 31.2" in line and line.endswith("feasible")


def test_a_failed_trial_line_says_why():
    t = _trial(TrialState.FAIL, error="GraphUnsupported: capturing failed")
    assert trial_line(t).endswith("fail: GraphUnsupported: capturing failed")


def test_a_trial_line_says_how_long_the_trial_took_and_parts_text_what_on():
    from optimize.app.console import parts_text

    parts = {"apply": 0.012, "timing": 3.02, "generation": 4.2, "clip": 0.51, "fidelity": 0.06, "capture": 0.3,
             "compile": 12.04}
    t = _trial(speedup=2.1, spread=0.04, score_loss=0.004, wall_s=8.14, parts=parts)
    assert "score_loss +0.0040  took 8.1 s  feasible" in trial_line(t, Goal("max", None, 0.02))
    # the parts in the order they ran; those within them (applying, captures, a lever's compile) after
    assert parts_text(t.user_attrs) == ("8.1 s: timing 3.0, generation 4.2, clip 0.51, fidelity 0.06 "
                                        "(within them: apply 0.01, capture 0.30, compile 12.0)")
    reused = _trial(speedup=2.1, spread=0.04, score_loss=0.004, wall_s=0.01, parts={}, reused_from=3)
    assert "took" not in trial_line(reused) and parts_text(reused.user_attrs) == "0.01 s"
    old = _trial(speedup=2.1, spread=0.04, score_loss=0.004)  # a trial from before they were recorded
    assert "took" not in trial_line(old) and parts_text(old.user_attrs) == ""


def test_a_pick_whose_loss_interval_reaches_past_the_bound_says_the_prompts_did_not_decide_it():
    """The offline demo's pick: loss -0.028 [-0.176, +0.119] under a 0.02 bound over 8 prompts is feasible
    on its point estimate, not shown to hold; with --confidence the upper end decided it already."""
    from optimize.app.console import undecided_note
    from optimize.study.record import INTERVALS, PSNR, SCORE_LOSS, Goal

    wide = {SCORE_LOSS: -0.028, INTERVALS: {"level": 0.9, "n": 8, SCORE_LOSS: [-0.176, 0.119]}}
    note = undecided_note(Goal("target", 1.5, 0.02), wide)
    assert note.startswith("the loss interval reaches past the bound (score_loss <= 0.02): 8 prompts")
    assert undecided_note(Goal("target", 1.5, 0.2), wide) == ""  # inside the bound
    assert undecided_note(Goal("target", 1.5, 0.02, confidence=0.9), wide) == ""
    assert undecided_note(Goal("max", None, 0.02), {SCORE_LOSS: 0.0}) == ""  # no interval: nothing to say
    psnr = {PSNR: 30.0, INTERVALS: {"level": 0.9, "n": 8, PSNR: [27.0, 33.0]}}
    assert "(psnr >= 28 dB)" in undecided_note(Goal("max", None, 28, loss_metric="psnr"), psnr)
    assert undecided_note(Goal("max", None, 26, loss_metric="psnr"), psnr) == ""
