"""One ``optimize-sd run``: open the study, load what it needs, reuse or measure the baseline, search.

Order matters: everything that can be checked against the stored study (goal, baseline fingerprint)
is checked before the pipeline loads. Several of these runs may share one study (``--workers``,
``--gpus``, several machines: see :mod:`optimize.workers`); study, settings and baseline are then
created once, and each run times the baseline on its own device.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import signal
import socket
import sys
import traceback
import zlib
from dataclasses import asdict, dataclass

import click
import optuna
from optuna.trial import TrialState

from . import pipelines
from .accelerators import Config, max_branch_id
from .baseline import ATTR as BASELINE_ATTR
from .baseline import Baseline, BaselineMismatch, check_fingerprint
from .measure import Evaluator, GenerationSettings
from .metrics import ClipScorer, FidelityScorer, MetricError, lpips_available, lpips_weights_path, score_loss
from .prompts import PromptsError, load_prompts, prompts_hash
from .report import best_entry, format_result, trial_line
from .search import Goal, Objective, SearchSpace, make_sampler, study_result, warm_start_params
from .storage import (BASELINE_PREFIX, StorageError, artifact_dir_for, artifact_store, baseline_image_ids,
                      insert_study_user_attr_once, load_baseline_images, open_storage, redact, storage_errors,
                      update_search_params, upload_images)

STUDY_ATTR = "optimize_sd"


class RunError(click.ClickException):
    exit_code = 2


class RunFailure(RunError):
    """A fault during a run (lost storage, full disk): completed trials are kept; exit 1."""

    exit_code = 1


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
    scored_repeats: int
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
    warm_start: bool = True
    speed_gate: bool = True
    images_per_trial: int = 4  # uploaded as artifacts, shown per trial by optuna-dashboard
    artifact_dir: str | None = None
    worker_index: int = 0  # set by the launcher (optimize.workers): seeds the sampler apart from other workers
    devices: tuple[str, ...] = ()  # --workers / --gpus: one worker process per entry


def study_name_for(spec: pipelines.PipeSpec, opts: RunOptions) -> str:
    return f"{spec.slug}-{opts.scheduler}-{opts.steps}steps-{opts.goal.slug}"


def search_params_key(spec: pipelines.PipeSpec, opts: RunOptions) -> str:
    """One key per (model, scheduler, steps, mode, loss metric and bound), e.g. ``sd1.5:ddim:50:target2:0.02``
    (CLIP score loss), ``sd1.5:ddim:50:pareto:ssim0.15``, ``sdxl:ddim:50:max:psnr25``."""
    g = opts.goal
    mode = f"target{g.target_speedup:g}" if g.mode == "target" else g.mode
    bound = f"{g.max_loss:g}" if g.loss_metric == "clip" else f"{g.loss_metric}{g.max_loss:g}"
    return f"{spec.name}:{opts.scheduler}:{opts.steps}:{mode}:{bound}"


def goal_of(study: optuna.Study) -> Goal:
    meta = study.user_attrs.get(STUDY_ATTR)
    if not meta:
        raise RunError(f"study {study.study_name!r} was not created by optimize-sd")
    g = meta["goal"]
    return Goal(g["mode"], g["target_speedup"], g["max_loss"], g.get("loss_metric", "clip"))


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


def sampler_seed(seed: int, n_before: int, worker_index: int = 0) -> int:
    """The TPE seed of one worker: derived from ``--seed``, fresh for every resumed run (or it would replay
    the first run's random start-up trials), and distinct per worker and machine (or workers started
    together would propose the same configurations). The same command on the same study state gets the
    same seed."""
    return zlib.crc32(f"{seed}:{n_before}:{socket.gethostname()}:{worker_index}".encode())


def _check_existing(study: optuna.Study, opts: RunOptions, fingerprint: dict) -> None:
    """Refuse a study made for another goal, or whose baseline was measured with other settings."""
    if STUDY_ATTR not in study.user_attrs:
        if study.get_trials(deepcopy=False):
            raise RunError(f"study {study.study_name!r} was not created by optimize-sd; use another --study")
        return  # created a moment ago by a worker that has not stored its settings yet
    goal = goal_of(study)
    if goal != opts.goal:
        raise RunError(f"study {study.study_name!r} exists with goal {goal.as_dict()}, not {opts.goal.as_dict()}; "
                       "use another --study")
    baseline = Baseline.load(study)
    if baseline is not None:
        try:
            check_fingerprint(baseline.fingerprint, fingerprint)
        except BaselineMismatch as e:
            raise RunError(str(e)) from None


def _open_study(storage, name: str, opts: RunOptions, fingerprint: dict):
    """Create the study, or load it and check it was made for the same goal and settings.

    Race-free for workers that start together on a fresh database, on one machine or several: the
    study's name and its settings are each inserted once (unique constraints decide) and every other
    worker checks the winner's settings against its own.
    """
    if name in optuna.get_all_study_names(storage):  # refuse a mismatch before writing anything
        _check_existing(optuna.load_study(study_name=name, storage=storage), opts, fingerprint)
    study = optuna.create_study(storage=storage, study_name=name, directions=opts.goal.directions, load_if_exists=True)
    meta = {"goal": opts.goal.as_dict(), "constraints": opts.goal.constraint_names, "fingerprint": fingerprint}
    if STUDY_ATTR not in study.user_attrs:
        _check_existing(study, opts, fingerprint)
        if insert_study_user_attr_once(storage, study._study_id, STUDY_ATTR, meta):
            study.set_metric_names(opts.goal.metric_names)  # shown by optuna-dashboard
            if opts.warm_start:  # only the process that created the study: workers would enqueue twice
                for params in warm_start_params(opts.methods, opts.steps):
                    study.enqueue_trial(params, skip_if_exists=True)
        else:
            _check_existing(study, opts, fingerprint)  # another worker stored its settings first
    # Trials run so far; enqueued ones (warm start, retries of dead workers' trials) are still to come.
    n_before = len([t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING])
    study.sampler = make_sampler(sampler_seed(opts.seed, n_before, opts.worker_index))
    return study, n_before


def _ensure_baseline(study: optuna.Study, storage, evaluator: Evaluator, fingerprint: dict, echo,
                     save_images=lambda images: None):
    """The study's baseline, this process's reference time (None: re-time before the first trial) and
    the baseline images this process measured (None if it measured none).

    A study without a baseline gets one measured here. Workers that start together on a fresh study
    each measure it on their own device (in parallel: no worker waits for another); the first stored
    is kept by the database's unique constraint, and the others use its CLIP scores with the time they
    measured on their own device, which is all a same-device speedup needs.
    """
    baseline = Baseline.load(study)
    if baseline is not None:
        echo("reusing the stored baseline")
        return baseline, None, None  # re-timed on this device before the first trial
    s = evaluator.settings
    echo(f"measuring baseline on {len(evaluator.prompts)} prompts ({s.steps} steps, {s.width}x{s.height})")
    try:
        m = evaluator.measure(Config(), paired=False)
        measured = Baseline.from_measurement(m, s, fingerprint)
        score_loss(measured.clip_score, measured.clip_score)  # a zero baseline score is an error
    except Exception as e:  # noqa: BLE001 - nothing can be searched without a baseline: one line
        raise RunError(f"baseline measurement failed: {type(e).__name__}: {e}") from e
    if insert_study_user_attr_once(storage, study._study_id, BASELINE_ATTR, asdict(measured)):
        meta = study.user_attrs[STUDY_ATTR]
        if meta.get("fingerprint") != fingerprint:
            study.set_user_attr(STUDY_ATTR, dict(meta, fingerprint=fingerprint))
        save_images(m.images)
        return measured, measured.time_per_image, m.images
    stored = Baseline.load(study)
    try:
        check_fingerprint(stored.fingerprint, fingerprint)
    except BaselineMismatch as e:
        raise RunError(str(e)) from None
    echo(f"another worker stored the baseline first: using its CLIP score {stored.clip_score:.3f} "
         f"(measured here: {measured.clip_score:.3f}) and the time measured on this device")
    return stored, measured.time_per_image, m.images


def _baseline_images(study: optuna.Study, store, directory: str, evaluator: Evaluator, measured, echo,
                     save_images) -> list:
    """The baseline image of every prompt, to compare each trial's images with (PSNR, SSIM, LPIPS).

    A process that measured the stored baseline has them already. Otherwise they are read from the
    study's artifacts; where those are missing (a worker on another machine without the artifact
    directory, a moved directory) they are generated again, with the same prompts and seeds.
    """
    if measured is not None:
        return measured  # also when another worker's baseline won: same prompts and seeds
    n = len(evaluator.prompts)
    stored = load_baseline_images(study, store, n) if store is not None else None
    if stored is not None:
        return stored
    echo(f"baseline images not found in {directory}: generating them again ({n} prompts, same seeds)")
    try:
        images = evaluator.measure(Config(), paired=False).images
    except Exception as e:  # noqa: BLE001 - nothing can be compared without them: one line
        raise RunError(f"baseline images could not be generated: {type(e).__name__}: {e}") from e
    if not baseline_image_ids(study):
        save_images(images)  # none were ever stored (a study from before they were kept)
    return images


def _fidelity_scorer(baseline_images, opts: RunOptions, echo) -> FidelityScorer:
    """PSNR and SSIM always; LPIPS where its weights are cached. Without them (or with an unreadable
    file) a run bounded on another metric says so once and goes on; ``--loss-metric lpips`` stops."""
    if lpips_available():
        try:
            return FidelityScorer(baseline_images, opts.device, lpips=True)
        except Exception as e:  # noqa: BLE001 - a damaged weights file
            if opts.goal.loss_metric == "lpips":
                raise RunError(f"cannot load LPIPS from {lpips_weights_path()}: {type(e).__name__}: "
                               f"{_first_line(e)}") from None
            echo(f"note: LPIPS not recorded: cannot load {lpips_weights_path()} ({type(e).__name__}: "
                 f"{_first_line(e)}); PSNR and SSIM are")
    elif opts.goal.loss_metric == "lpips":  # checked before anything loaded; the file went away since
        raise RunError(f"--loss-metric lpips needs torchvision's AlexNet weights at {lpips_weights_path()}")
    else:
        echo(f"note: LPIPS not recorded: torchvision's AlexNet weights are not at {lpips_weights_path()} "
             "(they are not downloaded during a run); PSNR and SSIM are")
    return FidelityScorer(baseline_images, opts.device)


def _free_memory() -> None:
    """Give a failed trial's memory back (its exception and frames are gone by now)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def worker_label(opts: RunOptions) -> str:
    """Stored on every trial as the ``worker`` user attr: which process on which machine ran it."""
    return f"{socket.gethostname()}:{os.getpid()} {opts.device}"


def _interrupt(signum, frame):
    # Once: a second signal while the first is being handled would cut the clean-up short.
    signal.signal(signum, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def prepare_study(spec: pipelines.PipeSpec, opts: RunOptions):
    """Everything before the pipeline loads: prompts, storage, the study (created or checked).

    Returns ``(prompts, storage, fingerprint, study, n_before)``; bad input is one :class:`RunError`.
    """
    try:
        prompts = load_prompts(opts.prompt_spec, opts.num_samples)
        storage = open_storage(opts.storage, heartbeat_interval=opts.heartbeat)
    except (PromptsError, StorageError) as e:
        raise RunError(str(e)) from None
    fingerprint = _fingerprint(spec, opts, prompts)
    name = opts.study_name or study_name_for(spec, opts)
    try:
        study, n_before = _open_study(storage, name, opts, fingerprint)
    except storage_errors() as e:
        raise RunFailure(f"storage {redact(opts.storage)} failed: {_first_line(e)}") from None
    return prompts, storage, fingerprint, study, n_before


def _storage_cause(e: BaseException) -> BaseException | None:
    """The storage error behind ``e``, if any (Optuna may raise another error while handling one)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, storage_errors()):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _first_line(e: BaseException) -> str:
    """The database's own words for ``e`` (Optuna wraps them in a generic message), first line only."""
    seen, cause = set(), e
    while cause is not None and id(cause) not in seen:
        if getattr(cause, "orig", None) is not None:
            e = cause.orig
            break
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_search(spec: pipelines.PipeSpec, opts: RunOptions) -> None:
    echo = click.echo
    prompts, storage, fingerprint, study, n_before = prepare_study(spec, opts)
    name = study.study_name
    echo(f"study {name} ({redact(opts.storage)}): {n_before} trials so far, adding {opts.n_trials}")
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
        steps=opts.steps, guidance=opts.guidance if opts.guidance is not None else pipelines.default_guidance(xl),
        height=opts.height or size, width=opts.width or size, batch_size=opts.batch_size, seed=opts.seed,
    )
    evaluator = Evaluator(pipe, scorer, prompts, settings, repeats=opts.repeats, progress=opts.progress,
                          scored_repeats=opts.scored_repeats)
    # A stored baseline's time is re-measured on this device before the first trial: the machine may have
    # changed since, or this may be another worker's GPU.
    directory = artifact_dir_for(opts.storage, opts.artifact_dir)
    try:
        store = artifact_store(directory)  # the baseline images always; trial images if --images-per-trial
    except OSError as e:  # pictures are not worth stopping a search for: the baseline's are regenerated
        store = None
        click.echo(f"optimize-sd: warning: images not saved: artifact directory {directory}: {e.strerror or e}",
                   err=True)

    def save_images(images, target, prefix: str, limit: int | None) -> None:
        if store is None or not images or limit == 0:
            return
        try:
            upload_images(images[:limit], target, store, prefix)
        except Exception as e:  # noqa: BLE001 - a trial's pictures are a convenience: never fail it over them
            click.echo(f"optimize-sd: warning: images not saved: {type(e).__name__}: {e}", err=True)

    def save_baseline_images(images) -> None:
        save_images(images, study, BASELINE_PREFIX, None)

    try:
        baseline, reference, measured = _ensure_baseline(study, storage, evaluator, fingerprint, echo,
                                                         save_baseline_images)
        baseline_images = _baseline_images(study, store, directory, evaluator, measured, echo, save_baseline_images)
    except storage_errors() as e:
        raise RunFailure(f"storage {redact(opts.storage)} failed: {_first_line(e)}") from None
    echo(f"baseline: {1000 * baseline.time_per_image:.1f} ms/image (±{100 * baseline.spread:.0f}%), "
         f"CLIP {baseline.clip_score:.3f}")
    fidelity = _fidelity_scorer(baseline_images, opts, echo)

    space = SearchSpace(opts.methods, opts.steps, max_branch_id(pipe), xl)
    # the re-timed baseline serves only runs without rounds, where a trial's time is the floor of its
    # scoring pass: as many calls, since a floor over more calls is lower
    retime_calls = max(1, len(prompts) // opts.batch_size)
    objective = Objective(evaluator, baseline, opts.goal, space, retime_every=opts.retime_every,
                          reference=reference, retime_calls=retime_calls, speed_gate=opts.speed_gate,
                          fidelity=fidelity)
    key = search_params_key(spec, opts)
    worker = worker_label(opts)

    def run_trial(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker)
        try:
            value = objective(trial)
        except BaseException as e:
            # Drop the locals of the frames that failed (activations of an out-of-memory trial, say) now,
            # not whenever the exception object goes.
            traceback.clear_frames(e.__traceback__)
            raise
        save_images(objective.last_images, trial, f"trial{trial.number}", opts.images_per_trial)
        objective.last_images = None
        return value

    from tqdm.auto import tqdm

    bar = tqdm(total=opts.n_trials, desc="trials", unit="trial", disable=not opts.progress, file=sys.stderr)
    unsaved: dict = {}  # the last failure to write search_params.json, until a later write succeeds

    def result():
        return study_result(study, opts.goal)

    def entry_for(trial, front) -> dict:
        entry = best_entry(trial, opts.goal)
        if opts.goal.mode == "pareto":
            entry["front"] = [best_entry(t, opts.goal) for t in front]
        entry.update(
            model=spec.name, pipe=spec.source, scheduler=opts.scheduler, steps=opts.steps, mode=opts.goal.mode,
            target_speedup=opts.goal.target_speedup, max_loss=opts.goal.max_loss, loss_metric=opts.goal.loss_metric,
            guidance=settings.guidance,
            height=settings.height, width=settings.width, batch_size=opts.batch_size, dtype=opts.dtype,
            device=fingerprint["device"], study=study.study_name, storage=redact(opts.storage),
            baseline_time_per_image=baseline.time_per_image, baseline_clip_score=baseline.clip_score,
            updated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        return entry

    def save_best(best, front) -> None:
        """Write ``best`` (and the pareto front) to search_params.json. Other workers write theirs too:
        after each write the study's result is read again and written if it changed, so the last writer
        always leaves the study's result in the file, whatever order the workers' writes came in."""
        for _ in range(10):
            try:
                update_search_params(opts.output, key, entry_for(best, front))
            except StorageError as e:  # the user's file is invalid: never overwritten, the study keeps the result
                tqdm.write(f"optimize-sd: warning: {opts.output} not updated: {e}", file=sys.stderr)
                return
            except OSError as e:  # disk full, read-only: the old file stays as it was (atomic replace)
                unsaved["error"] = e
                tqdm.write(f"optimize-sd: warning: {opts.output} not updated: {e}", file=sys.stderr)
                return
            unsaved.clear()
            now, now_front = result()
            if now is None or [t.number for t in (now, *now_front)] == [t.number for t in (best, *front)]:
                return
            best, front = now, now_front

    def after_trial(study: optuna.Study, trial) -> None:
        bar.update(1)
        tqdm.write(trial_line(trial))
        if trial.state == TrialState.FAIL:
            _free_memory()
        best, front = result()
        if trial.state == TrialState.COMPLETE and best is not None and (
                best.number == trial.number or any(t.number == trial.number for t in front)):
            save_best(best, front)

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our trial line reports failures
    # A scheduler's pre-emption (SIGTERM) ends the run like Ctrl-C: the running trial is marked failed
    # at once instead of waiting for its heartbeat to go stale.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        study.optimize(run_trial, n_trials=opts.n_trials, catch=(Exception,), callbacks=[after_trial],
                       gc_after_trial=True)
    except KeyboardInterrupt:
        bar.close()
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        echo(f"interrupted: {done} completed trials kept, the running one marked failed; run the same command to resume",
             err=True)
        sys.exit(130)
    except Exception as e:
        cause = _storage_cause(e)
        if cause is None:
            raise
        bar.close()
        raise RunFailure(f"storage {redact(opts.storage)} failed: {_first_line(cause)}; completed trials are kept and "
                         "a running trial is retried when the study next runs") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()
    best, front = result()
    if unsaved and best is not None:
        save_best(best, front)  # one more try at the end (space may have been freed)
    echo(format_result(study.study_name, opts.goal, best, front, baseline))
    if unsaved:
        e = unsaved["error"]
        raise RunFailure(f"{opts.output} not updated: {e.strerror or e}; the old file is intact and the study "
                         f"keeps every trial (optimize-sd best --study {name} shows the best)")
    if best is not None:
        echo(f"saved to {opts.output} under {key!r}")
