"""optimize.study.record: the goal's constraint arithmetic (every feasibility check of the search relies on it)
and the study record's stored form."""

from __future__ import annotations

import pytest

from optimize.study.record import STUDY_ATTR, Fingerprint, Goal, StudyRecord


def test_goal_constraints_and_values():
    t = Goal("target", 2.0, 0.02)
    assert t.direction == "minimize" and t.objective_name == "score_loss"
    assert t.constraints(speedup=2.5, loss=0.01) == pytest.approx([-0.5, -0.01])
    assert t.constraints(speedup=1.5, loss=0.03) == pytest.approx([0.5, 0.01])
    assert t.value(2.5, 0.01) == 0.01
    m = Goal("max", None, 0.05)
    assert m.direction == "maximize" and m.objective_name == "speedup"
    assert m.constraints(speedup=3.0, loss=0.01) == pytest.approx([-0.04])
    assert m.value(3.0, 0.01) == 3.0
    assert len(t.constraint_names) == 2 and len(m.constraint_names) == 1


@pytest.mark.parametrize("mode,target_speedup,max_loss", [
    ("target", None, 0.02), ("target", 1.0, 0.02), ("target", 0.5, 0.02), ("max", None, 0.0),
    ("max", None, 1.0), ("max", None, -0.1), ("nope", None, 0.02),
])
def test_goal_rejects_bad_bounds(mode, target_speedup, max_loss):
    with pytest.raises(ValueError):
        Goal(mode, target_speedup, max_loss)


def test_study_record_round_trips_and_keeps_its_stored_form():
    fingerprint = Fingerprint(pipe="tiny", scheduler="ddim", steps=8, device="cpu", seed=42)
    record = StudyRecord(Goal("target", 2.0, 0.02), fingerprint)
    stored = record.as_dict()
    assert stored == {"goal": {"mode": "target", "target_speedup": 2.0, "max_loss": 0.02, "loss_metric": "clip"},
                      "constraints": ["speedup >= target", "score_loss <= max_loss"],
                      "fingerprint": fingerprint.as_dict()}
    study = type("FakeStudy", (), {"user_attrs": {STUDY_ATTR: stored}})()
    assert StudyRecord.load(study) == record
    # a study from before loss_metric, and fingerprint fields this version does not know
    stored = {"goal": {"mode": "max", "target_speedup": None, "max_loss": 0.05}, "fingerprint": {"pipe": "x", "new": 1}}
    study.user_attrs = {STUDY_ATTR: stored}
    assert StudyRecord.load(study) == StudyRecord(Goal("max", None, 0.05, "clip"), Fingerprint(pipe="x"))
    study.user_attrs = {}
    assert StudyRecord.load(study) is None
