"""``search_params.json``: the best feasible configuration of each search, ready to use.

One entry per (model, scheduler, steps, mode, loss metric and bound) key, e.g.
``sd1.5:ddim:50:target2:0.02``: the trial's params and measurement, the settings it was found with and
the baseline it was measured against (pareto studies: the feasible front under ``front``). The file
is rewritten atomically under a lock and other keys are kept; a file that is not a JSON object is
never overwritten. ``best --json`` prints entries of the same form.

Example:
    >>> update_search_params("search_params.json", "tiny:ddim:20:max:0.02", {"params": {}})  # doctest: +SKIP
    >>> key, entry = read_entry("search_params.json")                                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
from dataclasses import dataclass, fields
from typing import Any

from ..study.files import atomic_write_json, read_only, writable_dir
from ..study.record import (CLIP_SCORE, CONFIDENCE, CONFIG, ENTRY_LEVEL, FIDELITY, INTERVAL_LEVEL, INTERVALS,
                            LOSS_INTERVAL, SCORE_LOSS, SPEEDUP, SPEEDUP_EAGER, SPEEDUP_INTERVAL, SPEEDUP_REPRODUCED, SPREAD,
                            TIME_PER_IMAGE, VALIDATION, Goal, Validation)
from ..study.storage import StorageError, redact

REQUIRED = ("pipe", "scheduler", "steps", "dtype")  # what generate needs of an entry


@dataclass(frozen=True)
class Entry:
    """What ``generate`` takes from an entry: the settings it was found with and its params, as stored
    (checked by :mod:`optimize.app.generate`, which says what is wrong with them)."""

    pipe: Any
    scheduler: Any
    steps: Any
    dtype: Any
    params: Any
    guidance: Any = None  # None: the pipeline's default
    height: Any = None  # None: the model's native size
    width: Any = None
    exec: Any = None  # execution mode it was found in; None: eager


class ParamsFileError(StorageError):
    """A search_params.json that cannot be read or has no usable entry; it is never overwritten."""


def search_params_key(spec, opts) -> str:
    """One key per (model, scheduler, steps, mode, loss metric and bound), e.g. ``sd1.5:ddim:50:target2:0.02``
    (CLIP score loss), ``sd1.5:ddim:50:pareto:ssim0.15``, ``sdxl:ddim:50:max:psnr25``."""
    g = opts.goal
    mode = f"target{g.target_speedup:g}" if g.mode == "target" else g.mode
    bound = f"{g.max_loss:g}" if g.loss_metric == "clip" else f"{g.loss_metric}{g.max_loss:g}"
    regime = "" if opts.exec_mode == "eager" else f":{opts.exec_mode}"
    confidence = "" if g.confidence is None else f":c{g.confidence:g}"  # conservative constraints: another result
    return f"{spec.name}:{opts.scheduler}:{opts.steps}:{mode}:{bound}{confidence}{regime}"


def trial_entry(trial, goal: Goal | None = None) -> dict[str, Any]:
    """A trial's result as search_params.json and ``best --json`` give it; with ``goal``, also the loss
    its bound applies to."""
    a = trial.user_attrs
    entry = {"trial": trial.number, CONFIG: a[CONFIG], "params": dict(trial.params)}
    entry.update({k: a[k] for k in (SPEEDUP, SCORE_LOSS, TIME_PER_IMAGE, SPREAD, CLIP_SCORE)})
    entry.update({k: a[k] for k in FIDELITY + (SPEEDUP_EAGER,) if k in a})
    if goal is not None:
        entry.update(loss_metric=goal.loss_metric, loss=goal.loss(a))
        entry.update(_uncertainty(trial, goal))
    return entry


def _uncertainty(trial, goal: Goal) -> dict[str, Any]:
    """The entry's intervals (the bounded loss's, in the units of ``loss``; the speedup's), their level, the
    study's --confidence and the held-out validation, where the trial has them."""
    a, out = trial.user_attrs, {}
    if a.get(INTERVALS):
        loss_interval, speedup_interval = goal.loss_interval(a), goal.speedup_interval(a)
        out = {LOSS_INTERVAL: list(loss_interval) if loss_interval else None,
               SPEEDUP_INTERVAL: list(speedup_interval) if speedup_interval else None,
               ENTRY_LEVEL: a[INTERVALS][INTERVAL_LEVEL], CONFIDENCE: goal.confidence}
    validation = Validation.of(trial)
    if validation is not None:
        out[VALIDATION] = validation.summary()
        # false: the held-out speedup fell outside the search's interval, so ``speedup`` is not a result
        out[SPEEDUP_REPRODUCED] = validation.speedup_reproduced
    return out


def run_entry(trial, front, *, spec, opts, settings, device: str, study_name: str, baseline) -> dict[str, Any]:
    """The entry a run writes: :func:`trial_entry` (with the pareto front) and the settings it was found
    with (``opts``: the run's options, ``settings``: its resolved generation settings)."""
    goal = opts.goal
    entry = trial_entry(trial, goal)
    if goal.mode == "pareto":
        entry["front"] = [trial_entry(t, goal) for t in front]
    entry.update(
        model=spec.name, pipe=spec.source, scheduler=opts.scheduler, steps=opts.steps, mode=goal.mode,
        target_speedup=goal.target_speedup, max_loss=goal.max_loss, loss_metric=goal.loss_metric,
        guidance=settings.guidance, height=settings.height, width=settings.width, batch_size=opts.batch_size,
        dtype=opts.dtype, device=device, exec=opts.exec_mode, study=study_name, storage=redact(opts.storage),
        baseline_time_per_image=baseline.time_per_image, baseline_clip_score=baseline.clip_score,
        updated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return entry


def best_json(study_name: str, goal: Goal, best, front, baseline) -> dict[str, Any]:
    """What ``best --json`` prints: the study's goal, baseline and best feasible entry (pareto: and front)."""
    data = {
        "study": study_name, "goal": goal.as_dict(),
        "baseline": {TIME_PER_IMAGE: baseline.time_per_image, CLIP_SCORE: baseline.clip_score} if baseline else None,
        "best": trial_entry(best, goal) if best else None,
    }
    if goal.mode == "pareto":
        data["front"] = [trial_entry(t, goal) for t in front]
    return data


def read_search_params(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ParamsFileError(f"{path} is not valid JSON ({e}); fix or move it, it is not overwritten") from None
    if not isinstance(data, dict):
        raise ParamsFileError(f"{path} does not hold a JSON object; fix or move it, it is not overwritten")
    return data


def check_writable(path: str) -> None:
    """Refuse (:class:`ParamsFileError`) an output that cannot be written: a read-only file (never
    replaced), or a directory where this process cannot create files (the file's, or the nearest one
    that exists where it is still to be made). ``run`` checks this before anything loads; a file made
    read-only later is refused by :func:`update_search_params`."""
    if _read_only(path):
        raise ParamsFileError(f"{path} is read-only: make it writable or pass another --output")
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(directory):  # created on the first write
        directory = os.path.dirname(directory)
    if not os.path.isdir(directory):
        raise ParamsFileError(f"cannot write {path}: {directory} is not a directory")
    if not writable_dir(directory):
        raise ParamsFileError(f"cannot write {path}: directory {directory} is not writable; "
                              "pass another --output")


def _read_only(path: str) -> bool:
    return os.path.exists(path) and read_only(path)  # its mode bits too: root is not stopped by them


@contextlib.contextmanager
def _locked(path: str):
    """Hold the lock every writer of ``path`` takes (a ``.NAME.lock`` file beside it)."""
    lock_path = os.path.join(os.path.dirname(os.path.abspath(path)), "." + os.path.basename(path) + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_search_params(path: str, key: str, entry: dict[str, Any]) -> None:
    """Set ``key`` in the JSON file at ``path``, keeping every other key (locked, atomic). A read-only
    file is :class:`PermissionError`: it is not replaced."""
    if _read_only(path):
        raise PermissionError(errno.EACCES, "the file is read-only", path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory) and not writable_dir(directory):  # made read-only since the run began
        raise PermissionError(errno.EACCES, "its directory is read-only", directory)
    os.makedirs(directory, exist_ok=True)
    with _locked(path):
        data = read_search_params(path)
        data[key] = entry
        atomic_write_json(path, data)


def add_validations(path: str, study_name: str, validations: dict[int, dict[str, Any]]) -> list[str]:
    """Put held-out validations (trial number -> :meth:`Validation.summary`) into the entries of
    ``path`` that hold those trials of ``study_name`` (and into their pareto ``front``), under the same
    lock as :func:`update_search_params`; entries of other studies and trials are left alone, none is
    created. Returns the keys changed."""
    if not os.path.exists(path):
        return []
    with _locked(path):
        data, changed = read_search_params(path), []
        for key, entry in data.items():
            if not isinstance(entry, dict) or entry.get("study") != study_name:
                continue
            for item in [entry] + [e for e in entry.get("front") or [] if isinstance(e, dict)]:
                if item.get("trial") in validations:
                    item[VALIDATION] = validations[item["trial"]]
                    item[SPEEDUP_REPRODUCED] = item[VALIDATION].get(SPEEDUP_REPRODUCED)
                    changed.append(key)
        if changed:
            atomic_write_json(path, data)
    return sorted(set(changed))


def update_pick(path: str, study_name: str, best, front, goal: Goal) -> list[str]:
    """The entries of ``path`` for ``study_name`` that hold another trial than the study's pick take the
    pick, ``best`` (pareto: and ``front``), as :func:`run_entry` gives it, the settings they were found with
    kept: a held-out validation may have passed their trial over (or let a faster one back in). None
    without a pick. Returns the keys changed."""
    if best is None or not os.path.exists(path):
        return []
    with _locked(path):
        data, changed = read_search_params(path), []
        for key, entry in data.items():
            if not isinstance(entry, dict) or entry.get("study") != study_name or entry.get("trial") == best.number:
                continue
            for stale in (VALIDATION, SPEEDUP_REPRODUCED, LOSS_INTERVAL, SPEEDUP_INTERVAL):
                entry.pop(stale, None)  # the other trial's, where the pick has none
            entry.update(trial_entry(best, goal))
            if goal.mode == "pareto":
                entry["front"] = [trial_entry(t, goal) for t in front]
            entry["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            changed.append(key)
        if changed:
            atomic_write_json(path, data)
    return changed


def drop_passed_over(path: str, study_name: str, trials: set[int]) -> list[str]:
    """Remove the entries of ``path`` for ``study_name`` that hold one of ``trials`` (picks that broke the
    bound out of sample, where the study has no other pick): no file says they are a result. Returns the
    keys removed."""
    if not trials or not os.path.exists(path):
        return []
    with _locked(path):
        data = read_search_params(path)
        gone = [k for k, e in data.items() if isinstance(e, dict) and e.get("study") == study_name
                and e.get("trial") in trials]
        if gone:
            atomic_write_json(path, {k: v for k, v in data.items() if k not in gone})
    return gone


def read_entry(path: str, key: str | None = None) -> tuple[str, Entry]:
    """Entry ``key`` of the file at ``path`` (its only entry if ``key`` is None): ``(key, entry)``."""
    if not os.path.isfile(path):
        raise ParamsFileError(f"--params {path}: no such file")
    data = read_search_params(path)
    entries = {k: v for k, v in data.items() if isinstance(v, dict) and "params" in v}
    # keys whose value is no entry (no params): named as such, not counted as "0 entries"
    broken = [k for k in data if k not in entries] if key is None and not entries else [key] if key in data else []
    if broken and key not in entries:
        raise ParamsFileError(f"{path} [{', '.join(sorted(broken))}]: missing params (an entry as optimize-sd run "
                              "writes it has them)")
    if key is None:
        if len(entries) != 1:
            raise ParamsFileError(f"{path} has {len(entries)} entries: choose one with --key "
                                  f"({', '.join(sorted(entries)) or 'none'})")
        (key,) = entries
    elif key not in entries:
        raise ParamsFileError(f"{path} has no entry {key!r} (have: {', '.join(sorted(entries)) or 'none'})")
    missing = [f for f in REQUIRED if f not in entries[key]]
    if missing:
        raise ParamsFileError(f"{path} [{key}]: missing {', '.join(missing)}")
    return key, Entry(**{f.name: entries[key].get(f.name) for f in fields(Entry)})
