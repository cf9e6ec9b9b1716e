"""A study as optimize-sd stores it: the keys of its attrs, its goal, its settings, its feasible trials.

Every key optimize-sd stores in an Optuna study is spelt here, once:

* the study user attr :data:`STUDY_ATTR` holds a :class:`StudyRecord` (goal, constraint names,
  :class:`Fingerprint` of the settings); the baseline's own attr is :mod:`optimize.study.baseline`'s;
* each trial records its measurement as user attrs (:data:`SPEEDUP`, :data:`SCORE_LOSS`, ...) and its
  constraints under the system attr :data:`CONSTRAINTS_ATTR`, where optuna-dashboard shows feasibility
  and Optuna 5's TPE reads it; a running trial's process is its system attr :data:`OWNER`;
* each run takes a sampler slot, a study system attr under :data:`SAMPLER_SLOT`;
* its uncertainty (docs/trust.md): the per-prompt scores under the system attr :data:`PER_PROMPT`, the
  intervals of its losses and speedup under the user attr :data:`INTERVALS`, and a held-out
  re-validation under the system attr :data:`VALIDATION` (a :class:`Validation`).

Optuna's own keys of its queue and retry bookkeeping (``fixed_params``, ``failed_trial``,
``retry_history``) are spelt in :mod:`optimize.study.storage`, beside the re-queuing that writes them
(that module sits below this one).

Three goals, each under a bound on a loss (``--loss-metric``: relative CLIP score loss by default;
or PSNR, SSIM, LPIPS of each image against the baseline image of the same prompt and seed):

* ``target``: minimise the loss subject to ``speedup >= target`` and ``loss <= max_loss``;
* ``max``: maximise ``speedup`` subject to ``loss <= max_loss``;
* ``pareto``: two objectives, maximise ``speedup`` and minimise the loss, subject to ``loss <= max_loss``.

Example:
    >>> goal = Goal("max", None, 0.02)
    >>> goal.constraints(speedup=2.1, loss=0.01)
    [-0.01]
    >>> goal.loss({SPEEDUP: 2.1, SCORE_LOSS: 0.01})
    0.01
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from .storage import (StorageError, first_line, insert_study_user_attr_once, open_storage, redact,
                      storage_errors)

# --- stored keys ---------------------------------------------------------------------------------
STUDY_ATTR = "optimize_sd"  # study user attr: StudyRecord.as_dict()
PROMPT_SOURCE = "prompt_source"  # in StudyRecord.as_dict(): where the study's prompts came from
CONSTRAINTS_ATTR = "constraints"  # trial system attr: the list optuna-dashboard 0.21 reads to mark trials feasible
FAIL_REASON = "fail_reason"  # trial system attr Optuna itself writes for a failed trial
OWNER = "owner"  # trial system attr: the process running it (processes.identity(): host, machine, pid, start)
SAMPLER_SLOT = "sampler_slot"  # study system attrs "sampler_slot:<trials so far>:<slot>", one per run (runner)

# Trial user attrs. A measured trial has all of the first group (README: "Every trial records ...").
CONFIG = "config"  # Config.label() of the trial's configuration
SPEEDUP = "speedup"  # baseline time / time, both in the study's execution mode
SPEEDUP_EAGER = "speedup_vs_eager"  # eager baseline time / time (graph modes only)
SCORE_LOSS = "score_loss"  # relative CLIP score loss
TIME_PER_IMAGE = "time_per_image"  # seconds: the floor of the timed calls
TIME_MEDIAN = "time_median"
SPREAD = "spread"  # interquartile range / median of the timed calls
BASELINE_TIME = "baseline_time"  # the baseline time the speedup divides
CLIP_SCORE = "clip_score"
PSNR, SSIM, LPIPS = "psnr", "ssim", "lpips"  # against the baseline images (the names metrics.FidelityScorer gives)
LOSS_METRICS = ("clip", PSNR, SSIM, LPIPS)
# The bound each metric gets without --max-loss. psnr's is a minimum in dB; the others bound a loss.
DEFAULT_BOUNDS = {"clip": 0.02, PSNR: 25.0, SSIM: 0.15, LPIPS: 0.15}
PSNR_CAP = 100.0  # dB: identical images (infinite PSNR) and anything closer than 8 bits can show count as this
FIDELITY = (PSNR, SSIM, LPIPS)
ROUNDS = "rounds"  # paired rounds timed, when there were any
BASELINE_SPREAD = "baseline_spread"  # spread of the paired baseline calls
REUSED_FROM = "reused_from"  # number of the trial whose measurement a repeated configuration reused
WORKER = "worker"  # host:pid device of the process that ran the trial
ERROR = "error"  # why the trial failed
SKIPPED = "skipped"  # why the speed gate skipped its scoring
# What a trial's time went on: PARTS {part: wall seconds} (measure.Evaluator.parts: timing, generation,
# clip, apply, capture in a graph mode, any part a lever reports such as compile; and fidelity), WALL the
# whole trial's wall seconds (suggesting, measuring, scoring, recording). Parts may overlap (capture and
# apply happen within timing and generation); trials from before they were recorded have neither.
PARTS = "parts"
WALL = "wall_s"
PART_TIMING, PART_GENERATION, PART_CLIP, PART_FIDELITY = "timing", "generation", "clip", "fidelity"
PART_APPLY, PART_CAPTURE = "apply", "capture"
SEQUENTIAL_PARTS = (PART_TIMING, PART_GENERATION, PART_CLIP, PART_FIDELITY)  # one after another; the rest lie within
COMPILE_SECONDS = "compile_s"  # seconds torch.compile spent compiling during the trial (also PARTS["compile"])

# Uncertainty (docs/trust.md). PER_PROMPT: trial system attr {CLIP_SCORE: [...], PSNR: [...], ...}, one value
# per prompt in prompt order, rounded to 6 digits. INTERVALS: trial user attr {INTERVAL_LEVEL: 0.9, INTERVAL_N:
# prompts, SCORE_LOSS: [lo, hi], PSNR: [lo, hi], ..., SPEEDUP: [lo, hi]}: each attr's interval in its own units.
PER_PROMPT = "per_prompt"
INTERVALS = "intervals"
INTERVAL_LEVEL = "level"
INTERVAL_N = "n"
VALIDATION = "validation"  # trial system attr: Validation.as_dict()
# search_params.json entry fields (params_file): the bounded loss's and the speedup's interval, their level,
# the study's --confidence (None: constraints on the point estimates)
LOSS_INTERVAL = "loss_interval"
SPEEDUP_INTERVAL = "speedup_interval"
SPEEDUP_REPRODUCED = "speedup_reproduced"  # entry key: the held-out speedup fell inside the search's interval
CONFIDENCE = "confidence"
ENTRY_LEVEL = "interval_level"
DEFAULT_LEVEL = 0.9  # the level of the intervals shown when a study has no --confidence


MODES = ("target", "max", "pareto")


class StudyError(ValueError):
    """No such study, or one optimize-sd did not make; the message is one line."""


# --- the goal ------------------------------------------------------------------------------------
class _Loss(NamedTuple):
    name: str  # the loss's name (objective and metric names)
    attr: str  # the trial user attr it is computed from
    sign: float  # loss = offset + sign * attr: lower is better for every metric
    offset: float
    constraint: str  # the constraint's name, as optuna-dashboard lists it
    text: str  # axis title


# The loss each --loss-metric puts under the bound, from a trial's user attrs.
_LOSSES = {
    "clip": _Loss(SCORE_LOSS, SCORE_LOSS, 1, 0, "score_loss <= max_loss", "score_loss (relative CLIP score loss)"),
    "psnr": _Loss("neg_psnr", PSNR, -1, 0, "psnr >= min_psnr", "PSNR vs baseline image (dB)"),
    "ssim": _Loss("ssim_loss", SSIM, -1, 1, "1 - ssim <= max_loss", "1 - SSIM vs baseline image"),
    "lpips": _Loss(LPIPS, LPIPS, 1, 0, "lpips <= max_loss", "LPIPS vs baseline image"),
}
LOSS_TEXT = {m: loss.text for m, loss in _LOSSES.items()}


@dataclass(frozen=True)
class Goal:
    """What a study optimises, and under which bound.

    ``max_loss`` bounds the loss of ``loss_metric``: relative CLIP score loss (clip), 1 - SSIM (ssim),
    LPIPS (lpips); for psnr it is the minimum PSNR in dB, and the loss is -PSNR (bound -max_loss).
    """

    mode: str  # "target", "max" or "pareto"
    target_speedup: float | None
    max_loss: float
    loss_metric: str = "clip"
    # --confidence: constraints on the conservative end of each trial's interval at this level (None: on
    # the point estimates)
    confidence: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.loss_metric not in LOSS_METRICS:
            raise ValueError(f"unknown loss metric {self.loss_metric!r} (known: {', '.join(LOSS_METRICS)})")
        if self.mode == "target" and self.target_speedup is None:
            raise ValueError("--mode target needs --target-speedup")
        if self.mode != "target" and self.target_speedup is not None:
            raise ValueError(f"--target-speedup implies --mode target, not {self.mode}")
        if self.mode == "target" and not math.isfinite(self.target_speedup):  # nan is not "not greater than 1"
            raise ValueError(f"--target-speedup must be a finite number, got {self.target_speedup}")
        if self.mode == "target" and not self.target_speedup > 1:
            raise ValueError("--target-speedup must be greater than 1")
        if self.loss_metric == "psnr":
            if not 0 < self.max_loss <= PSNR_CAP:
                raise ValueError(f"--max-loss with --loss-metric psnr is the minimum PSNR in dB: must be in (0, {PSNR_CAP:g}]")
        elif not 0 < self.max_loss < 1:
            raise ValueError("--max-loss must be in (0, 1)")
        if self.confidence is not None and not 0 < self.confidence < 1:
            raise ValueError(f"--confidence must be in (0, 1), e.g. 0.9; got {self.confidence:g}")

    @property
    def directions(self) -> list[str]:
        return {"target": ["minimize"], "max": ["maximize"], "pareto": ["maximize", "minimize"]}[self.mode]

    @property
    def direction(self) -> str:
        """The single direction of a target or max study (a pareto study has two: :attr:`directions`)."""
        return self.directions[0]

    @property
    def loss_name(self) -> str:
        return _LOSSES[self.loss_metric].name

    @property
    def loss_attr(self) -> str:
        """The trial user attr the loss is computed from (``score_loss``, ``psnr``, ``ssim``, ``lpips``)."""
        return _LOSSES[self.loss_metric].attr

    @property
    def objective_name(self) -> str:
        """The objective's name (pareto: the first one, speedup)."""
        return self.loss_name if self.mode == "target" else SPEEDUP

    @property
    def metric_names(self) -> list[str]:
        return [SPEEDUP, self.loss_name] if self.mode == "pareto" else [self.objective_name]

    @property
    def bound(self) -> float:
        """The bound on :meth:`loss` (for psnr: minus the minimum PSNR)."""
        return -self.max_loss if self.loss_metric == "psnr" else self.max_loss

    @property
    def constraint_names(self) -> list[str]:
        names = (["speedup >= target"] if self.mode == "target" else []) + [_LOSSES[self.loss_metric].constraint]
        if self.confidence is None:
            return names
        return [f"{n} (conservative end of the {self.confidence:g} interval)" for n in names]

    @property
    def level(self) -> float:
        """The level of the intervals the study stores: its --confidence, else :data:`DEFAULT_LEVEL`."""
        return DEFAULT_LEVEL if self.confidence is None else self.confidence

    def loss(self, attrs: dict[str, Any]) -> float | None:
        """The loss under the bound, from a trial's user attrs (None if the trial lacks it)."""
        loss = _LOSSES[self.loss_metric]
        return loss.offset + loss.sign * attrs[loss.attr] if loss.attr in attrs else None

    def loss_interval(self, attrs: dict[str, Any]) -> tuple[float, float] | None:
        """The interval of :meth:`loss` from a trial's :data:`INTERVALS` (None where it has none)."""
        loss = _LOSSES[self.loss_metric]
        pair = (attrs.get(INTERVALS) or {}).get(loss.attr)
        if pair is None:
            return None
        lo, hi = sorted(loss.offset + loss.sign * v for v in pair)
        return lo, hi

    @staticmethod
    def speedup_interval(attrs: dict[str, Any]) -> tuple[float, float] | None:
        pair = (attrs.get(INTERVALS) or {}).get(SPEEDUP)
        return None if pair is None else (pair[0], pair[1])

    def constraints_of(self, attrs: dict[str, Any]) -> list[float]:
        """:meth:`constraints` of a trial's attrs: on the point estimates, or with ``confidence`` on the
        conservative ends (speedup's lower end, the loss's upper end). A trial without the interval a
        constraint needs is an error: a guess would decide feasibility."""
        speedup, loss = attrs[SPEEDUP], self.loss(attrs)
        if self.confidence is None:
            return self.constraints(speedup, loss)
        loss_interval, speedup_interval = self.loss_interval(attrs), self.speedup_interval(attrs)
        if loss_interval is None:
            raise ValueError(f"--confidence needs an interval of {self.loss_name} (at least 2 prompts)")
        if self.mode == "target" and speedup_interval is None:
            raise ValueError("--confidence in target mode needs a speedup interval (at least 2 timed calls)")
        return self.constraints(speedup_interval[0] if self.mode == "target" else speedup, loss_interval[1])

    def shown(self, loss: float) -> float:
        """A loss as people read it: the PSNR itself for psnr, the loss otherwise."""
        return -loss if self.loss_metric == "psnr" else loss

    def bound_text(self) -> str:
        if self.loss_metric == "psnr":
            return f"psnr >= {self.max_loss:g} dB"
        return f"{self.loss_name} <= {self.max_loss:g}"

    def constraints(self, speedup: float, loss: float) -> list[float]:
        """Values <= 0 mean satisfied (Optuna's convention)."""
        values = [loss - self.bound]
        return ([self.target_speedup - speedup] + values) if self.mode == "target" else values

    def value(self, speedup: float, loss: float):
        return {"target": loss, "max": speedup, "pareto": [speedup, loss]}[self.mode]

    @property
    def slug(self) -> str:
        head = f"target{self.target_speedup:g}" if self.mode == "target" else self.mode
        metric = "loss" if self.loss_metric == "clip" else self.loss_metric  # clip keeps the names it always had
        confidence = "" if self.confidence is None else f"-c{self.confidence:g}"  # another rule, another study
        return f"{head}-{metric}{self.max_loss:g}{confidence}"

    @classmethod
    def from_dict(cls, g: dict[str, Any]) -> "Goal":
        """The goal :meth:`as_dict` stored (studies from before ``loss_metric`` are clip studies, from
        before ``confidence`` decide on the point estimates)."""
        return cls(g["mode"], g["target_speedup"], g["max_loss"], g.get("loss_metric", "clip"), g.get(CONFIDENCE))

    def as_dict(self) -> dict[str, Any]:
        """The stored form; ``confidence`` only when set, so a study without it keeps the form it had."""
        stored = {"mode": self.mode, "target_speedup": self.target_speedup, "max_loss": self.max_loss,
                  "loss_metric": self.loss_metric}
        return stored if self.confidence is None else {**stored, CONFIDENCE: self.confidence}


DEFAULT_SEED = 42  # optimize-sd run's default; search_params.json entries do not store the seed


# --- the study record ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Fingerprint:
    """The settings a study's baseline was measured with; a run with other settings is refused
    (:func:`optimize.study.baseline.check_fingerprint` compares the dicts). Fields a study from an older
    version lacks are None."""

    pipe: str | None = None
    scheduler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    dtype: str | None = None
    device: str | None = None  # the device's name (``NVIDIA H100 80GB HBM3``, ``cpu``)
    batch_size: int | None = None
    prompts: str | None = None  # prompts_hash of the prompts
    num_samples: int | None = None
    seed: int | None = None
    clip: str | None = None  # ``model/pretrained``
    exec: str | None = None  # execution mode; None: eager (also studies from before graph modes)

    @property
    def run_seed(self) -> int:
        """The run's ``--seed`` (studies from before it was stored ran with the default)."""
        return DEFAULT_SEED if self.seed is None else self.seed

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Fingerprint":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StudyRecord:
    """What ``optimize-sd run`` stores on a study under :data:`STUDY_ATTR`: its goal (with the
    constraint names, for readers of the raw attr) and the fingerprint of its settings.

    >>> StudyRecord(Goal("max", None, 0.02)).as_dict()["constraints"]
    ['score_loss <= max_loss']
    """

    goal: Goal
    fingerprint: Fingerprint | None = None
    # where the prompts came from (``coco``, ``builtin``, a file's absolute path): the held-out prompts of
    # ``optimize-sd validate`` come after the study's; None for studies from before it was stored
    prompt_source: str | None = None

    def as_dict(self) -> dict[str, Any]:
        stored = {"goal": self.goal.as_dict(), "constraints": self.goal.constraint_names,
                  "fingerprint": self.fingerprint.as_dict() if self.fingerprint else None}
        return stored if self.prompt_source is None else {**stored, PROMPT_SOURCE: self.prompt_source}

    @classmethod
    def load(cls, study: optuna.Study) -> "StudyRecord | None":
        """The study's record; None for a study optimize-sd did not make (or has not stored yet)."""
        meta = study.user_attrs.get(STUDY_ATTR)
        if not meta:
            return None
        fingerprint = meta.get("fingerprint")
        return cls(Goal.from_dict(meta["goal"]), Fingerprint.from_dict(fingerprint) if fingerprint else None,
                   meta.get(PROMPT_SOURCE))

    def insert_once(self, storage, study: optuna.Study) -> bool:
        """Store the record unless one is stored; True if this call stored it (the database decides
        between workers racing to create the study)."""
        return insert_study_user_attr_once(storage, study._study_id, STUDY_ATTR, self.as_dict())

    @staticmethod
    def set_fingerprint(study: optuna.Study, fingerprint: Fingerprint) -> None:
        """Replace the stored fingerprint, keeping the rest of the stored record as it is."""
        meta = study.user_attrs[STUDY_ATTR]
        if meta.get("fingerprint") != fingerprint.as_dict():
            study.set_user_attr(STUDY_ATTR, dict(meta, fingerprint=fingerprint.as_dict()))


def goal_of(study: optuna.Study) -> Goal:
    """The goal a study was made for (:class:`StudyError` if optimize-sd did not make it)."""
    record = StudyRecord.load(study)
    if record is None:
        raise StudyError(f"study {study.study_name!r} was not created by optimize-sd")
    return record.goal


# --- picking a study -----------------------------------------------------------------------------
def pick_study(storage_url: str, name: str | None) -> optuna.Study:
    """The study ``name`` of a storage, or the one run most recently. The storage is opened read-only:
    nothing is created or written (a missing SQLite file is "no study database")."""
    try:
        storage = open_storage(storage_url, read_only=True)
    except StorageError as e:
        raise StudyError(str(e)) from None
    shown = redact(storage_url)
    try:
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
        if not summaries:
            raise StudyError(f"no study in {shown}")
        if name is None:
            name = max(summaries, key=lambda s: _last_activity(storage, s)).study_name
        elif name not in {s.study_name for s in summaries}:
            raise StudyError(f"no study {name!r} in {shown} (have: {', '.join(s.study_name for s in summaries)})")
        return optuna.load_study(study_name=name, storage=storage)
    except storage_errors() as e:  # the server went away after the open: its own words, as run says them
        raise StudyError(f"storage {shown} failed: {first_line(e, storage_url)}") from None


def _last_activity(storage, summary) -> _dt.datetime:
    """When a study last started or finished a trial (its creation time if it has none)."""
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    times = [t for tr in study.get_trials(deepcopy=False) for t in (tr.datetime_start, tr.datetime_complete) if t]
    return max(times, default=summary.datetime_start or _dt.datetime.min)


def open_study(storage_url: str, name: str | None) -> optuna.Study:
    """Load a study for reading: the named one, or the most recently run; never creates a database."""
    study = pick_study(storage_url, name)
    goal_of(study)  # refuses a study optimize-sd did not make
    return study


# --- feasibility and the front -------------------------------------------------------------------
def record_constraints(trial: optuna.Trial, values: list[float]) -> None:
    """Store constraint values where both TPE and optuna-dashboard 0.21 read them.

    ``Trial.set_constraint`` writes per-name keys that the dashboard ignores (it would show every
    trial feasible); the list under ``constraints`` is what ``constraints_func`` wrote, and TPE reads it too.
    """
    trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS_ATTR, [float(v) for v in values])


def record_per_prompt(trial: optuna.Trial, values: dict[str, list[float]]) -> None:
    """Store a trial's per-prompt scores (:data:`PER_PROMPT`), rounded to 6 digits: a system attr, so
    optuna-dashboard's table of user attrs stays readable."""
    trial.storage.set_trial_system_attr(trial._trial_id, PER_PROMPT, {k: rounded(v) for k, v in values.items()})


def rounded(values) -> list[float]:
    """Per-prompt values as studies store them (:data:`PER_PROMPT`): floats rounded to 6 digits."""
    return [round(float(x), 6) for x in values]


@dataclass(frozen=True)
class Validation:
    """A configuration measured again on prompts the search never saw, with fresh seeds (the trial
    system attr :data:`VALIDATION`; :mod:`optimize.app.validation` makes it). Losses and intervals are in
    the units of the trial's attrs of the same name; ``loss`` is the study's bounded loss (-PSNR for psnr)."""

    n: int  # held-out prompts
    seed: int  # the first prompt's seed (prompt i: seed + i)
    prompts: str  # prompts_hash of the held-out prompts
    level: float  # of the intervals
    loss_metric: str
    loss: float
    loss_interval: list[float] | None
    speedup: float
    speedup_interval: list[float] | None
    within_bound: bool  # the study's constraints hold out of sample (with --confidence: on the conservative ends)
    failed: list[str]  # the constraints that do not hold (their names)
    measured: dict[str, float]  # score_loss, clip_score, psnr, ssim (lpips): means over the held-out prompts
    per_prompt: dict[str, list[float]]  # the configuration's per-prompt values, as PER_PROMPT
    baseline_per_prompt: dict[str, list[float]]  # the untouched pipeline's CLIP scores on the same prompts and seeds
    device: str
    time: str  # when (UTC, ISO 8601)
    # the held-out speedup inside the interval the search measured for the trial (None: no interval, or a
    # validation made before this was recorded); False: the search's speedup did not reproduce
    speedup_reproduced: bool | None = None
    search_speedup_interval: list[float] | None = None  # that interval

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """What search_params.json keeps of it: everything but the per-prompt lists."""
        return {k: v for k, v in asdict(self).items() if k not in ("per_prompt", "baseline_per_prompt")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Validation":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def of(cls, trial: FrozenTrial) -> "Validation | None":
        data = trial.system_attrs.get(VALIDATION)
        return cls.from_dict(data) if data else None


def is_feasible(trial: FrozenTrial) -> bool:
    cons = trial.system_attrs.get(CONSTRAINTS_ATTR)
    return trial.state == TrialState.COMPLETE and cons is not None and all(c <= 0 for c in cons)


def _measured(trials, goal: Goal) -> list[FrozenTrial]:
    return [t for t in trials if SPEEDUP in t.user_attrs and goal.loss(t.user_attrs) is not None]


def best_feasible(study: optuna.Study, goal: Goal) -> FrozenTrial | None:
    """Best feasible trial: least loss (ties: more speedup) for target; most speedup (ties: less loss)
    for max and for pareto (its single pick: the fastest point of the feasible front)."""
    trials = _measured((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_feasible(t)),
                       goal)
    return pick(trials, goal)


def rejected_held_out(trial: FrozenTrial) -> bool:
    """The trial broke the study's bound on held-out prompts (its stored :class:`Validation`): its search
    numbers flattered it, so it is no pick whatever they say."""
    data = trial.system_attrs.get(VALIDATION)
    return bool(data) and data.get("within_bound") is False


def pick(trials, goal: Goal) -> FrozenTrial | None:
    """The best of measured feasible ``trials`` (:func:`rank_key`) that has a lever on, is faster than
    the baseline and was not rejected on held-out prompts (:func:`rejected_held_out`). The untouched
    configuration (sampled with every lever off) measures 1x plus noise, and a configuration slower than
    none at all is no result however well it keeps the bound (a target above 1 already sees to that; a
    loss bound alone does not)."""
    return min((t for t in trials if t.user_attrs[SPEEDUP] > 1.0 and t.user_attrs.get(CONFIG) != "baseline"
                and not rejected_held_out(t)), key=rank_key(goal), default=None)


def rank_key(goal: Goal):
    """Sort key of measured trials, best first: least loss (ties: more speedup) for target, most
    speedup (ties: less loss) otherwise; then the earlier trial."""
    if goal.mode == "target":
        return lambda t: (goal.loss(t.user_attrs), -t.user_attrs[SPEEDUP], t.number)
    return lambda t: (-t.user_attrs[SPEEDUP], goal.loss(t.user_attrs), t.number)


def pareto_front(trials, goal: Goal | None = None) -> list[FrozenTrial]:
    """Trials no other trial beats on both speedup (higher) and the goal's loss (lower; default: CLIP
    score loss), by loss ascending. Of several trials with the same measurement (a reused configuration)
    only the first is kept."""
    goal = goal or Goal("max", None, 0.02)
    front: list[FrozenTrial] = []
    best_speedup = -math.inf
    for t in sorted(_measured(trials, goal), key=lambda t: (goal.loss(t.user_attrs), -t.user_attrs[SPEEDUP], t.number)):
        if t.user_attrs[SPEEDUP] > best_speedup:
            front.append(t)
            best_speedup = t.user_attrs[SPEEDUP]
    return front


def study_result(study: optuna.Study, goal: Goal) -> tuple[FrozenTrial | None, list[FrozenTrial]]:
    """The best feasible trial and, for a pareto study, its feasible front (else []). A pareto study's
    best is the fastest point of its front, the front's last."""
    if goal.mode == "pareto":
        front = feasible_front(study, goal)
        return (front[-1] if front else None), front
    return best_feasible(study, goal), []


def feasible_front(study: optuna.Study, goal: Goal) -> list[FrozenTrial]:
    """The Pareto front (speedup up, loss down) of the study's feasible trials, less those rejected on
    held-out prompts (:func:`rejected_held_out`)."""
    return pareto_front([t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                         if is_feasible(t) and not rejected_held_out(t)], goal)
