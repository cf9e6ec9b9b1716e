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
