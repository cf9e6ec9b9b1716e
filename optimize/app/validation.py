"""Held-out re-validation: a search's pick measured again on prompts the search never saw (docs/trust.md).

A study's best trial is the best of many noisy measurements on the same prompts, so its own numbers
flatter it. After the trials of a run, the pick (the best feasible trial; a pareto study's fastest
feasible one, what ``generate`` uses) is generated again on ``N`` prompts disjoint from the search's
(:func:`optimize.measure.prompts.load_heldout`: the COCO captions, file lines or built-in captions after the
first ``--num-samples``) with fresh seeds (the study's seed + :data:`SEED_OFFSET`), beside the
untouched pipeline on the same prompts and seeds. The result, a :class:`optimize.study.record.Validation`
(losses with their paired intervals, speedup, whether the study's constraints hold out of sample), is
stored on the trial (system attr ``validation``) and in search_params.json; a pick that breaks the
bound out of sample, or whose held-out speedup falls outside the interval the search measured for it
(``speedup_reproduced`` false: the search's speedup was noise), is flagged in one line. A pick that breaks
the bound is no pick any more (:func:`optimize.study.record.rejected_held_out`: ``best``, ``generate`` and
search_params.json pass it over), and the next best is validated in its place, :data:`CANDIDATES` in all
at most (:func:`validate_pick`). ``optimize-sd validate`` does the same on an existing study
(:func:`validate_study`), its whole feasible front if asked.

Size without ``--validate``: ``max(8, num_samples // 4)`` prompts, run only when that costs at most
:data:`BUDGET` of the study (pipeline calls: ``N`` baseline and ``N`` configured images and the
configuration's paired rounds, against the images and rounds of the study's trials); otherwise a note
says it was skipped and how to ask for it.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import replace
from typing import Any

import optuna

from ..levers import Config
from .console import Echo, validation_text
from ..measure.evaluator import Evaluator, default_rounds, pin_cpu_threads
from ..measure.metrics import ClipScorer, FidelityScorer, MetricError, lpips_available, score_loss
from ..runtime.compiling import use_cache_dir
from ..runtime.pipelines import device_name
from ..study.artifacts import compile_cache_for
from ..measure.prompts import PromptsError, load_heldout, load_prompts, prompts_hash
from ..study.storage import StorageError, open_storage, rdb, set_trial_system_attr_after
from ..study.record import (CLIP_SCORE, CONFIG, INTERVALS, SCORE_LOSS, SPEEDUP, VALIDATION, Goal, StudyError, StudyRecord,
                    Validation, feasible_front, open_study, rounded, study_result)
from ..measure.uncertainty import intervals

SEED_OFFSET = 1000  # held-out prompt i is generated with seed + SEED_OFFSET + i
BUDGET = 0.20  # the share of a study's pipeline calls a default validation may cost
CANDIDATES = 3  # picks validated in turn after a run until one holds the bound out of sample


class ValidationError(ValueError):
    """A study or settings no validation can be run with; the message is one line."""


def default_size(num_samples: int) -> int:
    # at least 8: the validation chooses the pick (one that breaks the bound is passed over), and on the
    # testbed 4 captions let picks through that broke the bound on the 32 after them (docs/benchmarks.md)
    return max(8, num_samples // 4)


def planned_size(requested: int | None, num_samples: int, trials: int, rounds: int, gated: int = 0,
                 gate_rounds: int = 0) -> tuple[int, str | None]:
    """``(N, note)``: ``requested`` (``--validate N``) as given; without it the default size when it is
    within :data:`BUDGET` of the study's pipeline calls: ``trials`` scored trials of ``num_samples``
    prompts and ``rounds`` paired rounds each, and ``gated`` trials the speed gate stopped after their
    first ``gate_rounds``; else 0 and a note saying why.

    >>> planned_size(None, 8, 5, 6)[0]  # 5 scored trials: 100 calls; 8 prompts and 6 rounds cost 28
    0
    >>> planned_size(None, 8, 5, 6, gated=15, gate_rounds=3)  # and 15 gated ones: 190 calls
    (8, None)
    """
    if requested is not None:
        return requested, None
    n = default_size(num_samples)
    if 2 * (n + rounds) <= BUDGET * (trials * (num_samples + 2 * rounds) + gated * 2 * gate_rounds):
        return n, None
    return 0, (f"note: held-out validation skipped: {n} prompts would cost more than {100 * BUDGET:g}% of this "
               f"study's {trials + gated} trials (--validate {n} runs it anyway, --validate 0 turns it off)")


def bound_texts(goal: Goal) -> list[str]:
    """The constraints as people read them, in the order of :meth:`Goal.constraints`."""
    return ([f"speedup >= {goal.target_speedup:g}x"] if goal.mode == "target" else []) + [goal.bound_text()]


def stored(trial, prompts: list[str], seed: int) -> Validation | None:
    """The trial's validation if it was made on ``prompts`` with first seed ``seed``."""
    v = Validation.of(trial)
    return v if v is not None and (v.n, v.seed, v.prompts) == (len(prompts), seed, prompts_hash(prompts)) else None


class Validator:
    """Measures configurations on held-out prompts against the untouched pipeline on the same prompts
    and seeds (measured once, on first use). ``settings``: the study's generation settings; the seed
    is moved by :data:`SEED_OFFSET` here. ``score_batch``: the study's prompts per scoring call, so the
    held-out images are made as the search's were."""

    def __init__(self, pipe, scorer, prompts: list[str], settings, goal: Goal, device: str, *, repeats: int = 0,
                 scored_repeats: int = 0, exec_mode: str = "eager", score_batch: int | None = None):
        self.prompts, self.goal, self.device = prompts, goal, device
        self.settings = replace(settings, seed=settings.seed + SEED_OFFSET)
        self.evaluator = Evaluator(pipe, scorer, prompts, self.settings, repeats=repeats,
                                   scored_repeats=scored_repeats, exec=exec_mode, score_batch=score_batch)
        self.hash = prompts_hash(prompts)
        self._base = None
        self._fidelity = None

    def done(self, trial) -> Validation | None:
        """The trial's stored validation if it was made on these prompts and seeds."""
        return stored(trial, self.prompts, self.settings.seed)

    def _baseline(self):
        if self._base is None:
            self._base = self.evaluator.measure(Config(), paired=False)
            self._fidelity = FidelityScorer(self._base.images, self.device, lpips=lpips_available())
        return self._base

    def _verdict(self, attrs: dict[str, Any]) -> list[str]:
        """The constraints that do not hold on ``attrs`` (the study's rule: point estimates or, with
        --confidence, the conservative ends)."""
        try:
            values = self.goal.constraints_of(attrs)
        except ValueError as e:  # --confidence and no interval (a single held-out prompt)
            return [str(e)]
        return [text for text, c in zip(bound_texts(self.goal), values) if c > 0]

    def measure(self, trial) -> Validation:
        base = self._baseline()
        m = self.evaluator.measure(Config.from_params(trial.params))
        fidelity = self._fidelity.per_image(m.images)
        paired = m.reference is not None  # paired rounds; else the two scoring passes' calls
        reference = m.reference if paired else base.timing
        speedup = reference.best / m.timing.best
        measured = {SCORE_LOSS: score_loss(base.clip_score, m.clip_score), CLIP_SCORE: m.clip_score,
                    **{k: float(v.mean()) for k, v in fidelity.items()}}
        attrs = {SPEEDUP: speedup, **measured, INTERVALS: intervals(
            self.goal.level, base.scores, m.scores, fidelity, speedup, m.timing.samples, reference.samples, paired)}
        failed = self._verdict(attrs)
        loss_interval, speedup_interval = self.goal.loss_interval(attrs), self.goal.speedup_interval(attrs)
        # the search's speedup stands only if a fresh measurement lands where its interval says it could
        search = self.goal.speedup_interval(trial.user_attrs)
        return Validation(
            n=len(self.prompts), seed=self.settings.seed, prompts=self.hash, level=self.goal.level,
            loss_metric=self.goal.loss_metric, loss=self.goal.loss(attrs),
            loss_interval=list(loss_interval) if loss_interval else None, speedup=speedup,
            speedup_interval=list(speedup_interval) if speedup_interval else None, within_bound=not failed,
            failed=failed, measured=measured,
            per_prompt={CLIP_SCORE: rounded(m.scores), **{k: rounded(v) for k, v in fidelity.items()}},
            baseline_per_prompt={CLIP_SCORE: rounded(base.scores)}, device=device_name(self.device),
            time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            speedup_reproduced=None if search is None else bool(search[0] <= speedup <= search[1]),
            search_speedup_interval=None if search is None else list(search))

    def close(self) -> None:
        self.evaluator.close()


def validate_trials(study: optuna.Study, trials, validator: Validator, echo: Echo) -> dict[int, Validation]:
    """Validate each of ``trials`` (one already validated on the same prompts and seeds is not measured
    again) and store the result on it; a result that breaks the bound, or whose speedup falls outside the
    interval the search measured (the search's speedup did not reproduce), is one warning line on stderr.
    Returns trial number -> validation. Load the study again to see the stored attrs."""
    done: dict[int, Validation] = {}
    n, seed = len(validator.prompts), validator.settings.seed
    for t in trials:
        label = f"#{t.number} {t.user_attrs.get(CONFIG, '?')}"
        v = validator.done(t)
        if v is None:
            echo(f"validating {label} on {n} held-out prompts (seed {seed})")
            v = validator.measure(t)
            set_trial_system_attr_after(study._storage, t._trial_id, VALIDATION, v.as_dict())
        else:
            echo(f"{label}: already validated on these {n} held-out prompts (seed {seed})")
        done[t.number] = v
        if not v.within_bound or v.speedup_reproduced is False:  # one line, whatever went wrong
            echo(f"optimize-sd: warning: {label}: {validation_text(validator.goal, v)}", err=True)
    return done


def validate_pick(study: optuna.Study, goal: Goal, validator: Validator, echo: Echo, candidates: int = CANDIDATES,
                  rescore=None) -> tuple[optuna.Study, dict[int, Validation]]:
    """Validate the study's pick; one that breaks the bound out of sample is no pick any more
    (:func:`optimize.study.record.rejected_held_out`), so the next best is validated, ``candidates`` in
    all at most. ``rescore(study)``, called after each pick passed over, may score trials the search left
    unscored because of it (a run's speed gate) and return the study read afresh. Returns the study read
    afresh and what was validated (trial number -> validation)."""
    done: dict[int, Validation] = {}
    for i in range(candidates):
        best, _ = study_result(study, goal)
        if best is None:
            break
        done.update(validate_trials(study, [best], validator, echo))
        study = reloaded(study)
        if done[best.number].within_bound:
            break
        if rescore is not None and i + 1 < candidates:
            study = rescore(study)
        after, _ = study_result(study, goal)
        if after is None:
            echo(f"#{best.number} was the study's last feasible trial: the study has no pick", err=True)
        elif i + 1 < candidates:
            echo(f"#{best.number} is no longer the pick; the next best is #{after.number}")
        else:
            echo(f"optimize-sd: warning: the pick is now #{after.number}, not validated: the {candidates} best "
                 "broke the bound out of sample (optimize-sd validate checks it)", err=True)
    return study, done


def reloaded(study: optuna.Study) -> optuna.Study:
    """The study read afresh (Optuna caches finished trials: a validation stored since is not in its copy)."""
    return optuna.load_study(study_name=study.study_name, storage=rdb(study._storage))


# --- optimize-sd validate: a study's pick (or front) on held-out prompts ------------------------------------
def chosen_trials(study: optuna.Study, goal: Goal, trial_number: int | None, front: bool) -> list:
    """The trials to validate: trial ``trial_number``, the feasible front, or the pick."""
    if trial_number is not None:
        trial = {t.number: t for t in study.get_trials(deepcopy=False)}.get(trial_number)
        if trial is None or SPEEDUP not in trial.user_attrs or trial.state != optuna.trial.TrialState.COMPLETE:
            raise ValidationError(f"study {study.study_name!r} has no measured, completed trial #{trial_number}")
        return [trial]
    best, _ = study_result(study, goal)
    if best is None:
        raise ValidationError(f"study {study.study_name!r} has no feasible trial to validate; pick one with --trial N")
    return feasible_front(study, goal) if front else [best]


def heldout_for(record: StudyRecord, source: str | None, n: int) -> list[str]:
    """The study's held-out prompts: ``n`` after its search prompts, from ``source`` or the stored source;
    the search prompts must hash to the study's (or the held-out ones would not be held out)."""
    fp = record.fingerprint
    source = source or record.prompt_source
    if source is None:
        raise ValidationError("this study does not record where its prompts came from (made before that was "
                              "stored): pass the run's --prompts")
    try:
        search = load_prompts(source, fp.num_samples)
        if fp.prompts is not None and prompts_hash(search) != fp.prompts:
            raise ValidationError(f"--prompts {source}: its first {fp.num_samples} prompts are not this study's "
                                  "search prompts; pass the run's --prompts")
        return load_heldout(source, fp.num_samples, n)
    except PromptsError as e:
        raise ValidationError(str(e)) from None


def _load(record: StudyRecord, baseline, device: str):
    """The study's pipeline, its CLIP scorer and generation settings on ``device``, and the exec mode:
    the settings the study's baseline was measured with, resolved as ``generate`` resolves them."""
    from ..runtime import pipelines
    from .settings import PipelineSettings, SettingsError

    fp = record.fingerprint
    try:
        settings = PipelineSettings.of_study("study", fp, baseline, device=device)
        pipe, generation = settings.load()
        model, _, pretrained = str(fp.clip or "ViT-g-14/laion2b_s34b_b88k").partition("/")
        scorer = ClipScorer(model, None if pretrained in ("", "None") else pretrained, device, settings.dtype)
    except (SettingsError, pipelines.PipelineError, MetricError) as e:
        raise ValidationError(str(e)) from None
    return pipe, scorer, generation, settings.exec


def validate_study(storage_url: str, study_name: str | None, *, n: int | None = None, trial_number: int | None = None,
                   front: bool = False, device: str | None = None, prompts: str | None = None,
                   repeats: int | None = None, scored_repeats: int | None = None, echo: Echo):
    """``optimize-sd validate``: load the study's pipeline and settings, validate its pick (the next best
    in its place while one breaks the bound, :func:`validate_pick`; or ``front``, or trial ``trial_number``)
    on ``n`` held-out prompts. Returns ``(study read afresh, {number: validation})``."""
    from ..runtime import pipelines
    from ..study.baseline import Baseline

    try:
        study = open_study(storage_url, study_name)  # read-only: finds and checks it, creates nothing
        # the validation is written to the study: load it again through a storage that may write
        study = optuna.load_study(study_name=study.study_name, storage=open_storage(storage_url))
    except (StudyError, StorageError) as e:
        raise ValidationError(str(e)) from None
    record = StudyRecord.load(study)
    if record.fingerprint is None:
        raise ValidationError(f"study {study.study_name!r} stores no pipeline settings (no baseline was measured)")
    trials = chosen_trials(study, record.goal, trial_number, front)
    heldout = heldout_for(record, prompts, n or default_size(record.fingerprint.num_samples or 8))
    try:
        device = pipelines.resolve_device(device)
    except pipelines.PipelineError as e:
        raise ValidationError(str(e)) from None
    seed = record.fingerprint.run_seed + SEED_OFFSET
    if all(stored(t, heldout, seed) for t in trials):  # nothing to measure: no pipeline to load
        for t in trials:
            echo(f"#{t.number} {t.user_attrs.get(CONFIG, '?')}: already validated on these {len(heldout)} held-out "
                 f"prompts (seed {seed})")
        return study, {t.number: stored(t, heldout, seed) for t in trials}
    here = device_name(device)
    if record.fingerprint.device not in (None, here):
        echo(f"note: the study was measured on {record.fingerprint.device}, this is {here}: "
             "the held-out speedup is this device's")
    pin_cpu_threads(device)  # as the study's run timed it
    use_cache_dir(compile_cache_for(storage_url))  # the graphs the study's runs compiled
    baseline = Baseline.load(study)
    pipe, scorer, settings, exec_mode = _load(record, baseline, device)
    rounds = default_rounds(device, exec_mode)
    validator = Validator(pipe, scorer, heldout, settings, record.goal, device, exec_mode=exec_mode,
                          score_batch=baseline.score_batch if baseline is not None else None,
                          repeats=rounds[0] if repeats is None else repeats,
                          scored_repeats=rounds[1] if scored_repeats is None else scored_repeats)
    try:
        if trial_number is None and not front:  # the pick: the next best in turn while one breaks the bound
            return validate_pick(study, record.goal, validator, echo)
        results = validate_trials(study, trials, validator, echo)
    finally:
        validator.close()
    return reloaded(study), results
