"""One ``optimize-sd run``: open the study, load what it needs, reuse or measure the baseline, search.

Order matters: everything that can be checked against the stored study (goal, baseline fingerprint)
is checked before the pipeline loads.
"""

from __future__ import annotations

import datetime as _dt
import signal
import sys
from dataclasses import dataclass

import click
import optuna
from optuna.trial import TrialState

from . import pipelines
from .accelerators import max_branch_id
from .baseline import Baseline, BaselineMismatch, check_fingerprint
from .measure import Evaluator, GenerationSettings
from .metrics import ClipScorer, MetricError, score_loss
from .prompts import PromptsError, load_prompts, prompts_hash
from .report import best_entry, format_best, trial_line
from .search import Goal, Objective, SearchSpace, best_feasible, make_sampler
from .storage import StorageError, open_storage, update_search_params

STUDY_ATTR = "optimize_sd"


class RunError(click.ClickException):
    exit_code = 2


@dataclass(frozen=True)
class RunOptions:
    scheduler: str
    device: str
    dtype: str
    steps: int
    guidance: float | None
    height: int | None
    width: int | None
    batch_size: int
    prompt_spec: str
    num_samples: int
    clip_model: str
    clip_pretrained: str | None
    repeats: int
    goal: Goal
    methods: tuple[str, ...]
    n_trials: int
    storage: str
    study_name: str | None
    seed: int
    output: str
    heartbeat: int
    progress: bool
    retime_every: int = 10


def study_name_for(spec: pipelines.PipeSpec, opts: RunOptions) -> str:
    return f"{spec.slug}-{opts.scheduler}-{opts.steps}steps-{opts.goal.slug}"


def search_params_key(spec: pipelines.PipeSpec, opts: RunOptions) -> str:
    """One key per (model, scheduler, steps, mode, bound), e.g. ``sd1.5:ddim:50:target2:0.02``."""
    g = opts.goal
    mode = f"target{g.target_speedup:g}" if g.mode == "target" else "max"
    return f"{spec.name}:{opts.scheduler}:{opts.steps}:{mode}:{g.max_loss:g}"


def goal_of(study: optuna.Study) -> Goal:
    meta = study.user_attrs.get(STUDY_ATTR)
    if not meta:
        raise RunError(f"study {study.study_name!r} was not created by optimize-sd")
    g = meta["goal"]
    return Goal(g["mode"], g["target_speedup"], g["max_loss"])


def pick_study(storage_url: str, name: str | None) -> optuna.Study:
    try:
        storage = open_storage(storage_url)
    except StorageError as e:
        raise RunError(str(e)) from None
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    if not summaries:
        raise RunError(f"no study in {storage_url}")
    if name is None:
        name = max(summaries, key=lambda s: _last_activity(storage, s)).study_name
    elif name not in {s.study_name for s in summaries}:
        raise RunError(f"no study {name!r} in {storage_url} (have: {', '.join(s.study_name for s in summaries)})")
    return optuna.load_study(study_name=name, storage=storage)


def _last_activity(storage, summary) -> _dt.datetime:
    """When a study last started or finished a trial (its creation time if it has none)."""
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    times = [t for tr in study.get_trials(deepcopy=False) for t in (tr.datetime_start, tr.datetime_complete) if t]
    return max(times, default=summary.datetime_start or _dt.datetime.min)


def _fingerprint(spec, opts: RunOptions, prompts: list[str]) -> dict:
    import torch

    device_name = torch.cuda.get_device_name(opts.device) if opts.device.startswith("cuda") else "cpu"
    return {
        "pipe": spec.source, "scheduler": opts.scheduler, "steps": opts.steps, "guidance": opts.guidance,
        "height": opts.height, "width": opts.width, "dtype": opts.dtype, "device": device_name,
        "batch_size": opts.batch_size, "prompts": prompts_hash(prompts), "num_samples": len(prompts),
        "seed": opts.seed, "clip": f"{opts.clip_model}/{opts.clip_pretrained}",
    }


def _open_study(storage, name: str, opts: RunOptions, fingerprint: dict):
    """Create the study, or load it and check it was made for the same goal and settings."""
    if name in optuna.get_all_study_names(storage):
        existing = optuna.load_study(study_name=name, storage=storage)
        goal = goal_of(existing)
        if goal != opts.goal:
            raise RunError(f"study {name!r} exists with goal {goal.as_dict()}, not {opts.goal.as_dict()}; use another --study")
        baseline = Baseline.load(existing)
        if baseline is not None:
            try:
                check_fingerprint(baseline.fingerprint, fingerprint)
            except BaselineMismatch as e:
                raise RunError(str(e)) from None
        n_before = len(existing.trials)
    else:
        n_before = 0
    # A fresh seed per run, or a resumed study would replay the first run's random start-up trials.
    sampler = make_sampler(opts.seed + n_before)
    study = optuna.create_study(storage=storage, study_name=name, direction=opts.goal.direction,
                                sampler=sampler, load_if_exists=True)
    if STUDY_ATTR not in study.user_attrs:
        study.set_user_attr(STUDY_ATTR, {"goal": opts.goal.as_dict(), "constraints": opts.goal.constraint_names,
                                         "fingerprint": fingerprint})
        study.set_metric_names([opts.goal.objective_name])  # shown by optuna-dashboard
    return study, n_before


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_search(spec: pipelines.PipeSpec, opts: RunOptions) -> None:
    echo = click.echo
    try:
        prompts = load_prompts(opts.prompt_spec, opts.num_samples)
        storage = open_storage(opts.storage, heartbeat_interval=opts.heartbeat)
    except (PromptsError, StorageError) as e:
        raise RunError(str(e)) from None
    fingerprint = _fingerprint(spec, opts, prompts)
    name = opts.study_name or study_name_for(spec, opts)
    study, n_before = _open_study(storage, name, opts, fingerprint)
    baseline = Baseline.load(study)
    echo(f"study {name} ({opts.storage}): {n_before} trials so far, adding {opts.n_trials}")
    if spec.kind in ("random", "tiny", "tiny-xl") or opts.clip_pretrained is None:
        echo("note: random weights (pipeline or CLIP model): speed is real, CLIP scores and losses are meaningless")

    try:
        pipe = pipelines.load_pipeline(spec, opts.scheduler, opts.device, opts.dtype)
        scorer = ClipScorer(opts.clip_model, opts.clip_pretrained, opts.device, opts.dtype)
    except (pipelines.PipelineError, MetricError) as e:
        raise RunError(str(e)) from None
    xl = pipelines.is_xl(pipe)
    size = pipelines.native_size(pipe)
    settings = GenerationSettings(
        steps=opts.steps, guidance=opts.guidance if opts.guidance is not None else (5.0 if xl else 7.5),
        height=opts.height or size, width=opts.width or size, batch_size=opts.batch_size, seed=opts.seed,
    )
    evaluator = Evaluator(pipe, scorer, prompts, settings, repeats=opts.repeats, progress=opts.progress)
    reference = None  # a stored baseline's time is re-measured first: the machine may have changed since
    if baseline is None:
        echo(f"measuring baseline on {len(prompts)} prompts ({settings.steps} steps, {settings.width}x{settings.height})")
        try:
            baseline = Baseline.measure(evaluator, fingerprint)
            score_loss(baseline.clip_score, baseline.clip_score)  # a zero baseline score is an error
        except Exception as e:  # noqa: BLE001 - nothing can be searched without a baseline: one line
            raise RunError(f"baseline measurement failed: {type(e).__name__}: {e}") from e
        baseline.save(study)
        meta = dict(study.user_attrs[STUDY_ATTR], fingerprint=fingerprint)
        study.set_user_attr(STUDY_ATTR, meta)
        reference = baseline.time_per_image
    else:
        echo("reusing the stored baseline")
    echo(f"baseline: {1000 * baseline.time_per_image:.1f} ms/image (±{100 * baseline.spread:.0f}%), "
         f"CLIP {baseline.clip_score:.3f}")

    space = SearchSpace(opts.methods, opts.steps, max_branch_id(pipe), xl)
    objective = Objective(evaluator, baseline, opts.goal, space, retime_every=opts.retime_every,
                          reference=reference, retime_calls=max(3, opts.repeats))
    key = search_params_key(spec, opts)

    from tqdm.auto import tqdm

    bar = tqdm(total=opts.n_trials, desc="trials", unit="trial", disable=not opts.progress, file=sys.stderr)

    def after_trial(study: optuna.Study, trial) -> None:
        bar.update(1)
        tqdm.write(trial_line(trial))
        best = best_feasible(study, opts.goal)
        if trial.state == TrialState.COMPLETE and best is not None and best.number == trial.number:
            entry = best_entry(trial)
            entry.update(
                model=spec.name, pipe=spec.source, scheduler=opts.scheduler, steps=opts.steps, mode=opts.goal.mode,
                target_speedup=opts.goal.target_speedup, max_loss=opts.goal.max_loss, guidance=settings.guidance,
                height=settings.height, width=settings.width, batch_size=opts.batch_size, dtype=opts.dtype,
                device=fingerprint["device"], study=study.study_name, storage=opts.storage,
                baseline_time_per_image=baseline.time_per_image, baseline_clip_score=baseline.clip_score,
                updated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            )
            try:
                update_search_params(opts.output, key, entry)
            except (StorageError, OSError) as e:  # keep searching; the study still holds the result
                tqdm.write(f"optimize-sd: warning: {opts.output} not updated: {e}", file=sys.stderr)

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our trial line reports failures
    # A scheduler's pre-emption (SIGTERM) ends the run like Ctrl-C: the running trial is marked failed
    # at once instead of waiting for its heartbeat to go stale.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        study.optimize(objective, n_trials=opts.n_trials, catch=(Exception,), callbacks=[after_trial],
                       gc_after_trial=True)
    except KeyboardInterrupt:
        bar.close()
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        echo(f"interrupted: {done} completed trials kept, the running one marked failed; run the same command to resume",
             err=True)
        sys.exit(130)
    bar.close()
    best = best_feasible(study, opts.goal)
    echo(format_best(study.study_name, opts.goal, best, baseline))
    if best is not None:
        echo(f"saved to {opts.output} under {key!r}")
