"""optimize.app.validation on its own: how many held-out prompts, which trials (the held-out measurement
itself runs through the command line in tests/app/test_trust.py)."""

from __future__ import annotations

import pytest
from helpers import synthetic_study

from optimize.app import validation
from optimize.levers import Config, DeepCache
from optimize.study.record import Goal


def test_the_default_size_is_a_quarter_of_the_search_prompts_at_least_eight():
    assert validation.default_size(8) == 8 and validation.default_size(64) == 16


def test_a_default_validation_runs_only_within_its_budget():
    assert validation.planned_size(None, 32, 20, 5) == (8, None)  # 8 prompts vs 20 trials: cheap
    n, note = validation.planned_size(None, 32, 1, 5)  # one trial: the validation would cost more than it
    assert n == 0 and "held-out validation skipped" in note and "--validate 8" in note
    assert validation.planned_size(3, 32, 1, 5) == (3, None)  # asked for: run whatever it costs


def test_the_trials_chosen_are_the_pick_a_trial_or_the_front(tmp_path):
    goal = Goal("max", None, 0.02)
    study = synthetic_study(f"sqlite:///{tmp_path / 's.db'}", "s", goal, [
        (Config(deepcache=DeepCache(3, 0)), 2.0, 0.01), (Config(deepcache=DeepCache(5, 0)), 3.0, 0.05),
        (Config(deepcache=DeepCache(4, 0)), 2.5, 0.015)])
    assert [t.number for t in validation.chosen_trials(study, goal, None, False)] == [2]  # fastest feasible
    assert [t.number for t in validation.chosen_trials(study, goal, 1, False)] == [1]  # any measured one
    assert {t.number for t in validation.chosen_trials(study, goal, None, True)} == {0, 2}
    with pytest.raises(validation.ValidationError, match="no measured, completed trial #7"):
        validation.chosen_trials(study, goal, 7, False)
