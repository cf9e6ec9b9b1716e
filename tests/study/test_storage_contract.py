"""Optuna's own storage contract (``optuna.testing.pytest_storages.StorageTestCase``) run against the
storage a run opens (:func:`optimize.study.storage.open_storage`, with the owner record), on SQLite and on
PostgreSQL (tests/pgserver.py).

One deliberate deviation, named here and checked for what it is: a trial created to run now carries
its process in the system attr ``owner`` (:data:`optimize.study.record.OWNER`). It stays a system attr rather
than moving beside Optuna's heartbeats (``trial_heartbeats``, one timestamp column): it is written in
the same transaction that creates the trial, so no running trial is ever without it, yet it needs no
table or column of ours in a schema that Optuna migrates (alembic) and other tools read, and it is
seen where Optuna keeps the rest of a retry's bookkeeping (``failed_trial``, ``retry_history``) and
where optuna-dashboard shows it. Two cases of the suite expect a new trial's system attrs to be empty:
they run here on the same storage with the owner record switched off, and the record itself is
checked beside them. Every other case runs as Optuna wrote it.
"""

from __future__ import annotations

import pytest
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._rdb import models
from optuna.study._study_direction import StudyDirection
from optuna.testing.pytest_storages import StorageTestCase
from optuna.trial import TrialState

try:
    from pgserver import fresh_database, require_server
except ImportError:  # tests/ made a package
    from tests.pgserver import fresh_database, require_server

from optimize.study.processes import identity
from optimize.study.storage import open_storage
from optimize.study.record import OWNER

# one fresh database per case: about a second each to create Optuna's tables
pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}" if request.param == "sqlite" else fresh_database(require_server())
    opened = open_storage(url, owner_key=OWNER)
    yield opened
    opened.remove_session()
    opened.engine.dispose()


class TestOptunaStorageContract(StorageTestCase):
    # --- the deliberate deviation: the owner record of a trial created to run -------------------------
    def test_create_new_trial(self, storage) -> None:
        """As Optuna's, with the owner record off; with it on, the record is the only difference."""
        study_id = storage.create_new_study(directions=[StudyDirection.MINIMIZE])
        trial_id = storage.create_new_trial(study_id)
        assert storage.get_trial(trial_id).system_attrs == {OWNER: identity()}
        storage.owner_key = None
        super().test_create_new_trial(storage)

    def test_set_trial_system_attr(self, storage) -> None:
        storage.owner_key = None
        super().test_set_trial_system_attr(storage)

    # --- what the contract says about a finished trial, spelt out where ours once broke it -----------
    @pytest.mark.parametrize("finished", [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED])
    def test_a_finished_trial_never_runs_again_nor_gets_a_heartbeat(self, storage, finished) -> None:
        """Asked to go RUNNING, a finished trial raised nothing (it returned False) and got a heartbeat
        row, which could make it look alive."""
        study_id = storage.create_new_study(directions=[StudyDirection.MINIMIZE])
        trial_id = storage.create_new_trial(study_id, template_trial=_waiting())
        assert storage.set_trial_state_values(trial_id, TrialState.RUNNING)
        with storage.engine.begin() as conn:  # the heartbeat written when it was popped, gone
            conn.execute(models.TrialHeartbeatModel.__table__.delete())
        assert storage.set_trial_state_values(trial_id, finished, [1.0] if finished == TrialState.COMPLETE else None)
        with pytest.raises(UpdateFinishedTrialError):
            storage.set_trial_state_values(trial_id, TrialState.RUNNING)
        with storage.engine.connect() as conn:
            assert conn.execute(models.TrialHeartbeatModel.__table__.select()).fetchall() == []
        assert storage.get_trial(trial_id).state == finished


def _waiting():
    from optuna.trial import create_trial

    return create_trial(state=TrialState.WAITING)
