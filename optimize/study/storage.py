"""The database of studies: an Optuna RDB storage, opened race-free, with a heartbeat.

Studies go to an RDB storage (default ``sqlite:///studies/optimize-sd.db``; ``postgresql://...`` for
workers on several machines) with a heartbeat, so a trial whose process died is marked failed and
re-queued by the next worker that starts a trial (:class:`HeartbeatStorage`: at once when that process
is recorded on this machine and gone). Many processes may open a fresh database at once:
tables are created once, and attrs that must be set once (the study's settings, its baseline) are
inserted, never overwritten (:func:`insert_study_user_attr_once`). ``search_params.json`` is
:mod:`optimize.app.params_file`, the images :mod:`optimize.study.artifacts`.

Example:
    >>> redact("postgresql://me:secret@db/studies")
    'postgresql://me:***@db/studies'
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from .files import disk_note
from .processes import identity, is_gone

DEFAULT_STORAGE = "sqlite:///studies/optimize-sd.db"
SCHEMES = ("sqlite", "postgresql", "mysql")
SQLITE_TIMEOUT = 60  # seconds a write waits for another process's lock (``?timeout=N`` in the URL overrides)
CONNECT_TIMEOUT = 10  # seconds to reach a PostgreSQL server (``?connect_timeout=N`` overrides)


MAX_RETRY = 2  # times a trial's configuration is queued again after its run died or was interrupted
# Optuna's own trial system attrs: the queue's (Study.enqueue_trial) and its retry bookkeeping
# (RetryHeartbeatStaleTrialCallback), which the re-queuing below keeps.
FIXED_PARAMS, FAILED_TRIAL, RETRY_HISTORY = "fixed_params", "failed_trial", "retry_history"


class StorageError(ValueError):
    pass


class HeartbeatStorage(RDBStorage):
    """Optuna's RDB storage, where no running trial is ever left without a heartbeat, and a trial whose
    process is gone from this machine is stale at once.

    Optuna fails a stale trial only if it has a heartbeat row, which a thread writes once the trial
    runs: a process killed between creating (or popping) a trial and that thread's first write left the
    trial RUNNING for good. Here a created trial gets its first heartbeat in the same transaction, and a
    queued one just before it is popped. ``owner_key`` names the trial system attr that records the
    running process (:func:`optimize.study.processes.identity`); retries never inherit it.
    """

    def __init__(self, url: str, *, owner_key: str | None = None, **kwargs):
        self.owner_key = owner_key
        super().__init__(url, heartbeat_stale_trial_callback=self.requeue, **kwargs)

    def _get_prepared_new_trial(self, study_id, template_trial, session):
        trial = super()._get_prepared_new_trial(study_id, template_trial, session)
        if template_trial is None:  # a trial created to run now (not a queued or copied one)
            session.add(models.TrialHeartbeatModel(trial_id=trial.trial_id))
            if self.owner_key:
                self._set_trial_attr_without_commit(session, models.TrialSystemAttributeModel, trial.trial_id,
                                                    self.owner_key, identity())
        return trial

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        if state != TrialState.RUNNING:
            return super().set_trial_state_values(trial_id, state, values)
        # Optuna's contract first: a finished trial cannot run again (UpdateFinishedTrialError), one that
        # runs already is not taken (False), and neither gets a heartbeat row.
        current = self._trial_state(trial_id)
        self.check_trial_is_updatable(trial_id, current)
        if current != TrialState.WAITING:
            return False
        # A queued trial being popped: its heartbeat before it runs (a row on a trial still waiting, or
        # one another process pops first, is harmless); its owner only once it is this process's.
        self.record_heartbeat(trial_id)
        if not self._claim(trial_id):
            return False
        if self.owner_key:
            self.set_trial_system_attr(trial_id, self.owner_key, identity())
        return True

    def _trial_state(self, trial_id: int) -> TrialState:
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session) as session:
            row = session.query(models.TrialModel.state).filter(models.TrialModel.trial_id == trial_id).one_or_none()
        if row is None:
            raise KeyError(f"no trial with trial_id {trial_id}")
        return row[0]

    def _claim(self, trial_id: int) -> bool:
        """WAITING -> RUNNING in one conditional UPDATE. Optuna reads the state, then writes it: on SQLite
        (no row locks) two processes both read WAITING and both ran the same queued trial, the slower
        one failing with "Cannot tell a COMPLETE trial"."""
        from datetime import datetime, timezone

        from optuna.storages._rdb.storage import _create_scoped_session

        model = models.TrialModel
        if hasattr(model, "_datetime_start_utc"):  # Optuna 5 stores naive UTC behind a property
            start = {model._datetime_start_utc: datetime.now(timezone.utc).replace(tzinfo=None)}
        else:  # Optuna 4: the column itself, local time
            start = {model.datetime_start: datetime.now()}
        with _create_scoped_session(self.scoped_session) as session:
            claimed = (session.query(model).filter(model.trial_id == trial_id, model.state == TrialState.WAITING)
                       .update({model.state: TrialState.RUNNING, **start}, synchronize_session=False))
        return claimed == 1

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        return stale + [i for i in self.dead_trial_ids(study_id) if i not in stale]

    def dead_trial_ids(self, study_id: int) -> list[int]:
        """Running trials whose process is recorded on this machine and gone (killed, crashed)."""
        if not self.owner_key:
            return []
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running if is_gone(t.system_attrs.get(self.owner_key))]

    def fail_dead_trials(self, study) -> list[tuple[FrozenTrial, bool]]:
        """Fail now the running trials whose process is gone from this machine and queue each again;
        ``(trial, queued again)`` for each this call failed (another process may fail one first)."""
        failed = []
        for trial_id in self.dead_trial_ids(study._study_id):
            try:
                if not study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            trial = study._storage.get_trial(trial_id)
            failed.append((trial, self.requeue(study, trial)))
        return failed

    def requeue(self, study, trial: FrozenTrial) -> bool:
        """Queue a failed trial's configuration again, with Optuna's retry bookkeeping (``failed_trial``:
        the first of the series, ``retry_history``), unless it was queued :data:`MAX_RETRY` times
        already; True if queued. The copy leaves out the dead run's owner: a process of this machine
        would otherwise take the copy for dead the moment it is popped."""
        history = [*trial.system_attrs.get(RETRY_HISTORY, []), trial.number]
        if len(history) > MAX_RETRY:
            return False
        attrs = {k: v for k, v in trial.system_attrs.items() if k != self.owner_key}
        attrs.update({FAILED_TRIAL: trial.system_attrs.get(FAILED_TRIAL, trial.number), RETRY_HISTORY: history})
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs=trial.user_attrs, system_attrs=attrs))
        return True


def from_queue(trial: FrozenTrial) -> bool:
    """Whether a trial ran a queued configuration (a warm start, a retry) rather than a sampled one."""
    return FIXED_PARAMS in trial.system_attrs or FAILED_TRIAL in trial.system_attrs


def redact(url: str) -> str:
    """``url`` with its password hidden, for messages and files, however the URL is written: worked out
    by hand, never by a parser that a mistyped URL would defeat. Everything between the user's ``:`` and
    the last ``@`` is hidden (more than the password where the rest holds an ``@``, never less: a password
    may hold an unescaped ``@``, ``:`` or ``/``), with any scheme (``postgresql:/u:pw@host`` too), and so
    is the value of every query parameter named like a password (``?password=``, ``?sslpassword=``)."""
    match = _SCHEME.match(url)
    prefix, rest = (match.group(), url[match.end():]) if match else ("", url)
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{host}"
    return _QUERY_SECRET.sub(r"\1***", prefix + rest)


_SCHEME = re.compile(r"[A-Za-z][\w+.-]*:/+")
_QUERY_SECRET = re.compile(r"([?&;][^=&;#]*pass[^=&;#]*=)[^&;#]*", re.IGNORECASE)
_DSN_SECRET = re.compile(r"(\bpass\w*\s*=\s*)(?!\*\*\*(?:[\s,;&:]|$))('(?:[^'\\]|\\.)*'|[^\s,;&]+)", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[A-Za-z][\w+.-]*:/+[^\s'\"]*[^\s'\":,.;)]")  # not the ":" or "," after it


def _secrets(url: str) -> list[str]:
    """Every spelling of the passwords in ``url`` (as written, percent-decoded, as SQLAlchemy parsed it)
    and their pieces, longest first."""
    from urllib.parse import parse_qsl, unquote

    found = set()
    match = _SCHEME.match(url)
    userinfo, at, _ = (url[match.end():] if match else url).rpartition("@")
    if at and ":" in userinfo:
        found.add(userinfo.split(":", 1)[1])
    for key, value in parse_qsl(url.partition("?")[2], keep_blank_values=True):
        if "pass" in key.lower():
            found.add(value)
    try:
        from sqlalchemy.engine import make_url

        found.add(make_url(url).password or "")
    except Exception:  # noqa: BLE001 - unparsable: the by-hand readings above stand
        pass
    found |= {unquote(s) for s in found}
    # and its pieces between the characters that end a URL's parts, which a driver may quote alone (a
    # host name "bravo@db"); pieces under 3 characters would garble every message and hide nearly nothing
    found |= {p for s in found for p in re.split(r"[@:/?#&=]", s) if len(p) >= 3}
    return sorted((s for s in found if s), key=len, reverse=True)


def scrub(text: str, url: str | None) -> str:
    """``text`` (a driver's error, say, which may echo the URL, its host part or a DSN) with no password
    of ``url`` left in it, and every URL or ``password=`` in it redacted."""
    text = _URL_IN_TEXT.sub(lambda m: redact(m.group()), text)
    text = _DSN_SECRET.sub(r"\1***", text)
    for secret in _secrets(url) if url else ():
        text = text.replace(secret, "***")
    return text


def hand_parsed(url: str) -> str:
    """``url`` as its writer meant it where the password holds an unescaped ``@``, ``:`` or ``/``: the
    user's ``:`` to the last ``@`` before the query is the password, percent-encoded here. SQLAlchemy
    would end the password at its first ``@`` and take the rest for the host, so a connection error would
    name part of the password as the host."""
    from urllib.parse import quote, unquote

    head, q, query = url.partition("?")
    match = _SCHEME.match(head)
    if not match:
        return url
    userinfo, at, host = head[match.end():].rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user, _, password = userinfo.partition(":")
    return f"{match.group()}{user}:{quote(unquote(password), safe='')}@{host}{q}{query}"


def check_storage_url(url: str) -> None:
    """Cheap checks before anything loads: a known scheme, a well-formed URL, its driver installed."""
    _engine_url(url)


def _engine_url(url: str):
    """The SQLAlchemy URL to open: ``postgresql://`` gets whichever driver is installed (psycopg, psycopg2)."""
    import importlib.util

    from sqlalchemy.engine import make_url

    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if "://" not in url or scheme not in SCHEMES:
        raise StorageError(f"unsupported storage {redact(url)!r}: use sqlite:///PATH, postgresql://... or mysql://...")
    try:
        u = make_url(url if scheme == "sqlite" else hand_parsed(url))
    except Exception as e:  # noqa: BLE001 - e.g. a port that is not a number
        raise StorageError(f"malformed storage URL {redact(url)!r}: {scrub(str(e), url)}") from None
    if u.get_backend_name() == "sqlite" and _in_memory(u):
        raise StorageError(f"{redact(url)!r} is an in-memory database, gone when the process ends: a study must "
                           "outlive it; use sqlite:///PATH")
    if u.drivername == "postgresql":
        for driver in ("psycopg", "psycopg2"):
            if importlib.util.find_spec(driver) is not None:
                return u.set(drivername=f"postgresql+{driver}")
        raise StorageError("PostgreSQL storage needs a driver: pip install psycopg2-binary (or 'optimize-sd[postgres]')")
    try:
        u.get_dialect().import_dbapi()
    except ImportError as e:
        raise StorageError(f"{scheme} storage needs its database driver ({e})") from None
    except Exception as e:  # noqa: BLE001 - unknown driver name after '+'
        raise StorageError(f"unsupported storage {redact(url)!r}: {scrub(str(e), url)}") from None
    return u


def _in_memory(u) -> bool:
    """Whether a SQLite URL names a database that lives in memory (``sqlite://``, ``sqlite:///:memory:``,
    ``sqlite:///file::memory:?uri=true``, ``?mode=memory``)."""
    database = u.database or ""
    return database in ("", ":memory:") or database.startswith("file::memory:") or u.query.get("mode") == "memory"


def open_storage(url: str, heartbeat_interval: int = 60, grace_period: int | None = None,
                 owner_key: str | None = None, read_only: bool = False):
    """An RDB storage with heartbeat and retry of trials whose worker died (``owner_key``: the trial
    system attr that records each running trial's process, for a run that runs trials).

    Many processes may open one fresh database at once (workers on several machines): table creation
    is serialised by an advisory lock on PostgreSQL and retried on SQLite, so exactly one creates it.
    Failures become one :class:`StorageError` line (server unreachable, file locked or not a database).
    ``read_only`` (``best``, ``report``, ``generate``, ``dashboard``) creates and writes nothing: see
    :func:`_read_only`.
    """
    import random
    import time

    u = _engine_url(url)
    backend = u.get_backend_name()
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        if "timeout" not in u.query:
            connect_args["timeout"] = SQLITE_TIMEOUT
    elif backend == "postgresql" and "connect_timeout" not in u.query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT
    if read_only:
        u = _read_only(url, u, connect_args)
    elif backend == "sqlite":
        try:
            os.makedirs(os.path.dirname(os.path.abspath(u.database)), exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot open storage {redact(url)}: cannot create its directory ({e})") from None
    engine_kwargs: dict[str, Any] = {"connect_args": connect_args}
    if backend != "sqlite":
        engine_kwargs["pool_pre_ping"] = True  # a server restart or dropped idle connection is survived
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    full_url = u.render_as_string(hide_password=False)
    for attempt in range(6):
        try:
            if read_only:
                return RDBStorage(full_url, engine_kwargs=engine_kwargs, skip_table_creation=True)
            with _schema_lock(u, connect_args):
                return HeartbeatStorage(
                    full_url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period or 2 * heartbeat_interval, owner_key=owner_key,
                )
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - unreachable server, locked or corrupt file: one clear line
            if read_only and _no_tables(e):
                raise StorageError(f"no study in {redact(url)}: it holds no Optuna tables (left untouched)") from None
            if not read_only and attempt < 5 and _is_creation_race(e):
                # another process created the same table or version row a moment before this one
                time.sleep(0.1 + random.random())
                continue
            raise StorageError(_explain(url, e)) from e
    raise AssertionError("not reached")


def _read_only(url: str, u, connect_args: dict[str, Any]):
    """The URL (and connection arguments) of a session that cannot write: a SQLite file that must exist
    (a missing one is "no study", and neither it nor its directory is created), opened ``mode=ro``;
    PostgreSQL with ``default_transaction_read_only`` on."""
    from urllib.parse import quote

    backend = u.get_backend_name()
    if backend == "sqlite":
        if not os.path.isfile(u.database):
            raise StorageError(f"no study database at {u.database} (run a search first, or pass --storage)")
        return u.set(database="file:" + quote(os.path.abspath(u.database)), query=dict(u.query, mode="ro", uri="true"))
    if backend == "postgresql":
        connect_args["options"] = "-c default_transaction_read_only=on"
    return u


def _chain(e: BaseException | None):
    """``e`` and the exceptions behind it (``__cause__``, else ``__context__``), each once."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def rdb(storage):
    """The RDBStorage itself: ``storage``, or the one Optuna's cache wraps."""
    return getattr(storage, "_backend", storage)


def _no_tables(e: BaseException) -> bool:
    """Whether a read-only open failed because the database has no Optuna tables (an empty file, say):
    the database's own words, wherever Optuna wrapped them."""
    text = " ".join(str(getattr(x, "orig", None) or x).lower() for x in _chain(e))
    return ("no such table" in text or ("relation" in text and "does not exist" in text)
            or "readonly database" in text or "read-only transaction" in text)


@contextlib.contextmanager
def _schema_lock(u, connect_args):
    """Hold a PostgreSQL advisory lock while Optuna creates or checks the tables (no-op elsewhere)."""
    if u.get_backend_name() != "postgresql":
        yield
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(u, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()


_LOCK_KEY = 0x6F70_7473_6400  # any fixed 64-bit number: "optsd"


def _is_creation_race(e: Exception) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("already exists", "duplicate key", "unique constraint", "integrityerror"))


def _explain(url: str, e: BaseException) -> str:
    """One line: what failed, the database's own words (wherever Optuna wrapped them: its read-only open
    raises "An exception is raised during the commit ..." around them), and what to do."""
    first = first_line(e, url)
    low = first.lower()
    hint = ""
    if "database is locked" in low:
        hint = "another process holds a lock on the file: retry once it is released; for many workers use PostgreSQL"
    elif "file is not a database" in low or "malformed" in low:
        hint = "not an SQLite database; it is left untouched: move it away or pass another --storage"
    elif "unable to open database file" in low:
        hint = "cannot create or open the file: check the path and its permissions"
    elif any(s in low for s in ("connection refused", "could not connect", "timeout expired", "could not translate",
                                "no route to host", "network is unreachable")):
        hint = "is the PostgreSQL server running and reachable from here?"
    return f"cannot open storage {redact(url)}: {first}" + (f" ({hint})" if hint else "")


def insert_study_user_attr_once(storage, study_id: int, key: str, value: Any) -> bool:
    """Set a study user attr only if it is not set yet; True if this call set it.

    The database's unique (study, key) constraint decides between processes racing to set it, on
    SQLite and PostgreSQL alike: exactly one wins, the others read the winner's value.
    """
    return _insert_once(storage, models.StudyUserAttributeModel, study_id, key, value)


def insert_study_system_attr_once(storage, study_id: int, key: str, value: Any) -> bool:
    """:func:`insert_study_user_attr_once` for a study system attr (not shown as the study's own)."""
    return _insert_once(storage, models.StudySystemAttributeModel, study_id, key, value)


def _insert_once(storage, model, study_id: int, key: str, value: Any) -> bool:
    from sqlalchemy.exc import IntegrityError

    table = model.__table__
    try:
        with storage.engine.begin() as conn:
            conn.execute(table.insert().values(study_id=study_id, key=key, value_json=json.dumps(value)))
    except IntegrityError:
        return False
    return True


def set_trial_system_attr_after(storage, trial_id: int, key: str, value: Any) -> None:
    """Set a system attr of a trial in any state, a finished one included (Optuna refuses to change
    those; a held-out validation is added to a completed trial afterwards). ``storage``: an RDBStorage
    or Optuna's cache around one. A study loaded before the call still shows the old attrs: load it again."""
    from sqlalchemy.exc import IntegrityError

    table = models.TrialSystemAttributeModel.__table__
    text = json.dumps(value)
    where = (table.c.trial_id == trial_id) & (table.c.key == key)
    for attempt in range(2):  # an insert racing another process's insert of the same key becomes an update
        try:
            with rdb(storage).engine.begin() as conn:
                if not conn.execute(table.update().where(where).values(value_json=text)).rowcount:
                    conn.execute(table.insert().values(trial_id=trial_id, key=key, value_json=text))
            return
        except IntegrityError:
            if attempt:
                raise


def storage_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the storage failed under a running study (lost server, locked file)."""
    from sqlalchemy.exc import SQLAlchemyError

    return (optuna.exceptions.StorageInternalError, SQLAlchemyError)


def storage_cause(e: BaseException) -> BaseException | None:
    """The storage error behind ``e``, if any (Optuna may raise another error while handling one)."""
    return next((x for x in _chain(e) if isinstance(x, storage_errors())), None)


def first_line(e: BaseException, url: str | None = None) -> str:
    """The database's own words for ``e`` (Optuna wraps them in a generic message), first line only,
    with no password of ``url`` (or of any URL or DSN it quotes) in it."""
    e = next((x.orig for x in _chain(e) if getattr(x, "orig", None) is not None), e)
    text = str(e).strip()
    line = scrub(text.splitlines()[0].strip(), url) if text else type(e).__name__
    if url and url.startswith("sqlite:///") and "disk is full" in line.lower():  # SQLite's words name no disk
        line += f" ({disk_note(url[len('sqlite:///'):].split('?', 1)[0])})"
    return line
