"""One ``optimize-sd run``: open the study, load what it needs, reuse or measure the baseline, search.

Order matters: everything that can be checked against the stored study (goal, baseline fingerprint)
is checked before the pipeline loads. Several of these runs may share one study (``--workers``,
``--gpus``, several machines: see :mod:`optimize.app.workers`); study, settings and baseline are then
created once, and each run times the baseline on its own device.

The library never exits or prints by itself: errors are the plain exceptions below (the command line
turns them into exit codes), progress lines go to an ``echo(line, err=False)`` callback.

Example:
    >>> spec, opts = check_run_options(...)          # doctest: +SKIP
    >>> run_search(spec, opts, echo=print)            # doctest: +SKIP
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import socket
import sys
import traceback
import zlib
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from . import console, validation
from .interrupts import interrupts_outside_storage
from ..runtime import pipelines
from ..levers import BY_NAME, Config, Context, Device
from ..runtime.compiling import use_cache_dir
from ..study.artifacts import (BASELINE_PREFIX, artifact_dir_for, artifact_store, baseline_image_ids, compile_cache_for,
                               load_baseline_images, trial_prefix, upload_images)
from ..measure.evaluator import Evaluator, default_score_batch, pin_cpu_threads
from ..measure.metrics import ClipScorer, FidelityScorer, MetricError, lpips_available, lpips_weights_path, score_loss
from ..study.baseline import Baseline, BaselineMismatch, check_fingerprint
from .params_file import ParamsFileError, drop_passed_over, run_entry, search_params_key, update_search_params
from .settings import PipelineSettings
from ..measure.prompts import PromptsError, counted, load_heldout, load_prompts, prompt_source, prompts_hash
from ..search import Objective, SearchSpace, make_sampler, warm_start_params
from ..study.storage import (MAX_RETRY, StorageError, first_line, from_queue, insert_study_system_attr_once, open_storage,
                      redact, storage_cause, storage_errors)
from ..study.record import (BASELINE_TIME, OWNER, REUSED_FROM, SAMPLER_SLOT, WORKER, Fingerprint, Goal, StudyRecord,
                            CONFIG, SPEEDUP, goal_of, rejected_held_out, study_result)


LOAD_SWING = 2.0  # the untouched pipeline's slowest / fastest time before a run notes that the load changed
RESCORE = 5  # configurations the speed gate skipped, scored after a pick is passed over (Search.rescore_gated)


class RunError(Exception):
    """Bad input, or a study this run cannot use: nothing was searched (the command line exits 2)."""


class RunFailure(RunError):
    """A fault during a run (lost storage, full disk): completed trials are kept (the command line exits 1)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM ended the run: completed trials are kept, the running one is marked failed
    (the command line prints the message and exits 130)."""


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
    warm_start: bool = True
    speed_gate: bool = True
    images_per_trial: int = 4  # uploaded as artifacts, shown per trial by optuna-dashboard
    artifact_dir: str | None = None
    devices: tuple[str, ...] = ()  # --workers / --gpus: one worker process per entry
    exec_mode: str = "eager"  # --exec: eager, graphs or compile (optimize.runtime.graphs)
    validate: int | None = None  # --validate: held-out prompts for the pick (0: none; None: the default size, if cheap)
    score_batch: int | None = None  # --score-batch: a new study's prompts per scoring call (None: the default)
    notes: tuple[str, ...] = ()  # said once before anything loads (levers left out on this device)


def unavailable_methods(methods: tuple[str, ...], device: str, explicit: bool = False) -> dict[str, str]:
    """The levers of ``methods`` a run leaves out on ``device``, each with why (asks the driver, loads no
    model): those that cannot run there and, unless the user named them (``explicit``), those that would
    gain nothing there (:meth:`optimize.levers.Lever.no_gain`)."""
    ctx = Context(device=Device.of(device))
    reasons = {name: BY_NAME[name].unavailable(ctx) or (None if explicit else BY_NAME[name].no_gain(ctx))
               for name in methods}
    left_out = {name: reason for name, reason in reasons.items() if reason is not None}
    searched = [m for m in methods if m not in left_out]
    for name in searched:
        needed = missing_partner(name, searched)
        if needed is not None:
            left_out[name] = f"searched only together with {needed}, which this run does not search"
    return left_out


def missing_partner(name: str, searched) -> str | None:
    """The lever ``name`` is searched only together with (:attr:`optimize.levers.Lever.requires`), where
    ``searched`` lacks it; else None."""
    needed = BY_NAME[name].requires
    return needed if needed is not None and needed not in searched else None


def left_out_note(left_out: dict[str, str], device: str) -> str:
    """One line for the levers a run leaves out of its search (:func:`unavailable_methods`)."""
    return f"note: left out of the search on {device}: " + "; ".join(f"{n}: {r}" for n, r in left_out.items())


def study_name_for(spec: pipelines.PipeSpec, opts: RunOptions) -> str:
    mode = "" if opts.exec_mode == "eager" else f"-{opts.exec_mode}"  # one regime per study
    return f"{spec.slug}-{opts.scheduler}-{opts.steps}steps-{opts.goal.slug}{mode}"


def settings_for(spec: pipelines.PipeSpec, opts: RunOptions) -> PipelineSettings:
    """The pipeline settings of a run, as validate and generate read them back from its study."""
    return PipelineSettings(spec, opts.scheduler, opts.steps, opts.guidance, opts.height, opts.width, opts.dtype,
                            opts.device, opts.seed, opts.batch_size, opts.exec_mode)


def fingerprint_for(spec, opts: RunOptions, prompts: list[str]) -> Fingerprint:
    """The settings this run's baseline is (or was) measured with."""
    return Fingerprint(
        pipe=spec.source, scheduler=opts.scheduler, steps=opts.steps, guidance=opts.guidance,
        height=opts.height, width=opts.width, dtype=opts.dtype, device=pipelines.device_name(opts.device),
        batch_size=opts.batch_size, prompts=prompts_hash(prompts), num_samples=len(prompts),
        seed=opts.seed, clip=f"{opts.clip_model}/{opts.clip_pretrained}",
        exec=None if opts.exec_mode == "eager" else opts.exec_mode,
    )


def planned_validation(opts: RunOptions, study: optuna.Study) -> tuple[int, str]:
    """How many held-out prompts the pick of ``study`` is validated on after a run with ``opts``, and the
    note to print (:func:`optimize.app.validation.planned_size`), whether one process ran the trials or many."""
    trials = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    # the speed gate's, which ran their paired rounds (an invalid draw is pruned too, having run nothing)
    gated = sum(SPEEDUP in t.user_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    return validation.planned_size(opts.validate, opts.num_samples, trials, opts.scored_repeats if opts.repeats else 0,
                                   gated, opts.repeats)


def sampler_seed(seed: int, n_before: int, slot: int = 0) -> int:
    """The TPE seed of one run: derived from ``--seed``, fresh for every resumed run (or it would replay
    the first run's random start-up trials), and distinct per :func:`sampler_slot` (or runs started
    together would propose the same configurations). The first run to open a study at a given trial
    count gets slot 0, so the same command on a fresh study proposes the same start-up trials."""
    return zlib.crc32(f"{seed}:{n_before}:{slot}".encode())


def sampler_slot(storage, study: optuna.Study, n_before: int) -> int:
    """This process's place among the runs that opened the study at ``n_before`` trials: the first free
    one, taken by inserting a key the database holds once. Two identical commands started together
    (same host, same trial count, both worker 0) therefore never get the same seed; pids or host names
    would tell them apart too, but would make a single run's seed differ every time."""
    for slot in itertools.count():
        if insert_study_system_attr_once(storage, study._study_id, f"{SAMPLER_SLOT}:{n_before}:{slot}",
                                         f"{socket.gethostname()}:{os.getpid()}"):
            return slot
    raise AssertionError("not reached")


def _check_fingerprint(stored: dict, current: Fingerprint) -> None:
    try:
        check_fingerprint(stored, current.as_dict())
    except BaselineMismatch as e:
        raise RunError(str(e)) from None


def _check_existing(study: optuna.Study, opts: RunOptions, fingerprint: Fingerprint) -> None:
    """Refuse a study made for another goal, or whose baseline was measured with other settings."""
    if StudyRecord.load(study) is None:
        if study.get_trials(deepcopy=False):
            raise RunError(f"study {study.study_name!r} was not created by optimize-sd; use another --study")
        return  # created a moment ago by a worker that has not stored its settings yet
    goal = goal_of(study)
    if goal != opts.goal:
        raise RunError(f"study {study.study_name!r} exists with goal {goal.as_dict()}, not {opts.goal.as_dict()}; "
                       "use another --study")
    baseline = Baseline.load(study)
    if baseline is not None:
        _check_fingerprint(baseline.fingerprint, fingerprint)


def _open_study(storage, name: str, opts: RunOptions, fingerprint: Fingerprint, echo):
    """Create the study, or load it and check it was made for the same goal and settings.

    Race-free for workers that start together on a fresh database, on one machine or several: the
    study's name and its settings are each inserted once (unique constraints decide) and every other
    worker checks the winner's settings against its own.
    """
    if name in optuna.get_all_study_names(storage):  # refuse a mismatch before writing anything
        _check_existing(optuna.load_study(study_name=name, storage=storage), opts, fingerprint)
    study = optuna.create_study(storage=storage, study_name=name, directions=opts.goal.directions, load_if_exists=True)
    if StudyRecord.load(study) is None:
        _check_existing(study, opts, fingerprint)
        if StudyRecord(opts.goal, fingerprint, prompt_source(opts.prompt_spec)).insert_once(storage, study):
            study.set_metric_names(opts.goal.metric_names)  # shown by optuna-dashboard
            if opts.warm_start:  # only the process that created the study: workers would enqueue twice
                ctx = Context(steps=opts.steps, scheduler=opts.scheduler, device=Device.of(opts.device))
                for params in warm_start_params(opts.methods, ctx):  # none of a lever that cannot run here
                    study.enqueue_trial(params, skip_if_exists=True)
        else:
            _check_existing(study, opts, fingerprint)  # another worker stored its settings first
    _retry_dead_trials(storage, study, echo)
    # Trials run so far; enqueued ones (warm start, retries of dead workers' trials) are still to come.
    n_before = len([t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING])
    study.sampler = make_sampler(sampler_seed(opts.seed, n_before, sampler_slot(storage, study, n_before)))
    return study, n_before


def _retry_dead_trials(storage, study: optuna.Study, echo) -> None:
    """A run started again at once after ``kill -9`` (or a crash) on this machine: the dead run's trial
    is failed and queued again now, not once its heartbeat is stale (trials of other machines wait for
    theirs). One line says which."""
    failed = storage.fail_dead_trials(study)
    if len(failed) == 1:
        (trial, queued), = failed
        echo(f"trial #{trial.number} was left running by pid {trial.system_attrs[OWNER]['pid']} on this machine, "
             f"which is gone: marked failed{_queued_again(queued)}")
    elif failed:
        echo("trials left running by processes gone from this machine, marked failed: " + ", ".join(
            f"#{t.number} (pid {t.system_attrs[OWNER]['pid']}, {_fate(q)})" for t, q in failed))


def _fate(queued: bool) -> str:
    return "queued again" if queued else f"not queued again: retried {MAX_RETRY} times already"


def _queued_again(queued: bool) -> str:
    """How a line about a failed trial ends: ``... marked failed`` + this."""
    return f" and {_fate(queued)}" if queued else f" ({_fate(queued)})"


def prepare_study(spec: pipelines.PipeSpec, opts: RunOptions, echo: console.Echo = lambda line, err=False: None):
    """Everything before the pipeline loads: the levers left out on this device and the trials of dead
    runs of this machine queued again (each said in one line to ``echo``), prompts, storage, the study
    (created or checked).

    Returns ``(prompts, storage, fingerprint, study, n_before)``; bad input is one :class:`RunError`.
    """
    for note in opts.notes:
        echo(note)
    try:
        prompts = load_prompts(opts.prompt_spec, opts.num_samples)
        storage = open_storage(opts.storage, heartbeat_interval=opts.heartbeat, owner_key=OWNER)
    except (PromptsError, StorageError) as e:
        raise RunError(str(e)) from None
    fingerprint = fingerprint_for(spec, opts, prompts)
    name = opts.study_name or study_name_for(spec, opts)
    try:
        study, n_before = _open_study(storage, name, opts, fingerprint, echo)
    except storage_errors() as e:
        raise RunFailure(f"storage {redact(opts.storage)} failed: {first_line(e, opts.storage)}") from None
    return prompts, storage, fingerprint, study, n_before


def scoring_batch(study: optuna.Study, opts: RunOptions, settings, n_prompts: int, echo) -> int | None:
    """Prompts per call of the scoring pass. A stored baseline's own (its images were made that way and
    trials' images must compare exactly; None: a study from before it was stored, scored in calls of
    its batch size), whatever ``--score-batch`` says now (a note says so if it says otherwise); else
    ``--score-batch`` or its default, at most the prompts."""
    wanted = min(opts.score_batch or default_score_batch(opts.device, settings.height, settings.width), n_prompts)
    stored = Baseline.load(study)
    if stored is None:
        return wanted
    if opts.score_batch is not None and wanted != stored.score_batch:
        how = (f"in calls of {stored.score_batch} prompts" if stored.score_batch is not None
               else "before --score-batch existed, one call per --batch-size")
        echo(f"note: this study's baseline images were made {how}: its trials are scored the same way "
             f"(--score-batch {opts.score_batch} applies to a new study)")
    return stored.score_batch


def ensure_baseline(study: optuna.Study, storage, evaluator: Evaluator, fingerprint: Fingerprint, echo,
                    save_images=lambda images, indices=None: None):
    """The study's baseline, the baseline images this process measured (None if it measured none) and
    whether the stored baseline is this process's measurement.

    A study without a baseline gets one measured here. Workers that start together on a fresh study
    each measure it on their own device (in parallel: no worker waits for another); the first stored
    is kept by the database's unique constraint, and the others use its CLIP scores. No trial divides
    by the stored time: each times the baseline beside itself, on its own device (paired rounds).
    """
    baseline = Baseline.load(study)
    if baseline is not None:
        echo("reusing the stored baseline")
        return baseline, None, False
    s = evaluator.settings
    scored = f", {evaluator.score_batch} per scoring call" if evaluator.score_batch else ""
    echo(f"measuring baseline on {len(evaluator.prompts)} prompts ({s.steps} steps, {s.width}x{s.height}{scored})")
    try:
        m = evaluator.measure(Config(), paired=False)
        measured = Baseline.from_measurement(m, s, fingerprint.as_dict(), evaluator.score_batch)
        score_loss(measured.clip_score, measured.clip_score)  # a zero baseline score is an error
    except Exception as e:  # noqa: BLE001 - nothing can be searched without a baseline: one line
        raise RunError(f"baseline measurement failed: {type(e).__name__}: {e}") from e
    if measured.insert_once(storage, study):
        StudyRecord.set_fingerprint(study, fingerprint)
        save_images(m.images)
        return measured, m.images, True
    stored = Baseline.load(study)
    _check_fingerprint(stored.fingerprint, fingerprint)
    echo(f"another worker stored the baseline first: using its CLIP score {stored.clip_score:.3f} "
         f"(measured here: {measured.clip_score:.3f})")
    if stored.score_batch != evaluator.score_batch:  # its images were made in other calls: score as it did
        evaluator.score_batch = stored.score_batch
        return stored, None, False
    return stored, m.images, False


def baseline_images(study: optuna.Study, store, directory: str, evaluator: Evaluator, measured, echo,
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
    # never stored (a study from before they were kept), or their storing was cut short (kill -9, a full
    # disk): stored now, or every later run would generate them again
    missing = [i for i in range(n) if i not in baseline_image_ids(study)]
    if missing:
        save_images([images[i] for i in missing], missing)
    return images


def fidelity_scorer(baseline_images, opts: RunOptions, echo) -> FidelityScorer:
    """PSNR and SSIM always; LPIPS where its weights are cached. Without them (or with an unreadable
    file) a run bounded on another metric says so once and goes on; ``--loss-metric lpips`` stops."""
    if lpips_available():
        try:
            return FidelityScorer(baseline_images, opts.device, lpips=True)
        except Exception as e:  # noqa: BLE001 - a damaged weights file
            if opts.goal.loss_metric == "lpips":
                raise RunError(f"cannot load LPIPS from {lpips_weights_path()}: {type(e).__name__}: "
                               f"{first_line(e)}") from None
            echo(f"note: LPIPS not recorded: cannot load {lpips_weights_path()} ({type(e).__name__}: "
                 f"{first_line(e)}); PSNR and SSIM are recorded")
    elif opts.goal.loss_metric == "lpips":  # checked before anything loaded; the file went away since
        raise RunError(f"--loss-metric lpips needs torchvision's AlexNet weights at {lpips_weights_path()}")
    else:
        echo(f"note: LPIPS not recorded: torchvision's AlexNet weights are not at {lpips_weights_path()} "
             "(they are not downloaded during a run); PSNR and SSIM are recorded")
    return FidelityScorer(baseline_images, opts.device)


def free_memory() -> None:
    """Give a failed trial's memory back (its exception and frames are gone by now)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def worker_label(opts: RunOptions) -> str:
    """Stored on every trial as the ``worker`` user attr: which process on which machine ran it."""
    return f"{socket.gethostname()}:{os.getpid()} {opts.device}"


def _params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def _why(e: Exception) -> str:
    """Why a file was not written, without its name (the line names it): a full disk names the disk."""
    return getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)


def run_search(spec: pipelines.PipeSpec, opts: RunOptions, echo: console.Echo = console.echo) -> None:
    """Run ``opts.n_trials`` trials of the study ``opts`` names (see :class:`Search`)."""
    Search(spec, opts, echo).run()


class Search:
    """One run of the search in this process, as named steps that :meth:`run` takes in order:
    open the study, load the models, get the baseline, build the objective, optimize, report.

    ``echo(line, err=False)`` gets every line for the user; lines while the progress bar is shown go
    through tqdm so that the bar stays below them.
    """

    def __init__(self, spec: pipelines.PipeSpec, opts: RunOptions, echo: console.Echo = console.echo):
        self.spec, self.opts, self.echo = spec, opts, echo
        self.unsaved: OSError | None = None  # the last failure to write search_params.json, until a write succeeds
        self.store = None
        self.study = None
        self.running = None  # the trial this process runs, while it runs one
        self.baseline_times: list[float] = []  # the untouched pipeline's time beside each trial of this run

    def run(self) -> None:
        """The steps in order. A scheduler's pre-emption (SIGTERM) ends any of them like Ctrl-C: one line
        and exit 130, not the default death (exit 143, nothing said); :meth:`optimize` says more. Either
        is raised outside the storage's code (:mod:`optimize.app.interrupts`)."""
        steps = ((self.open, "while opening the study"), (self.load, "while loading the models"),
                 (self.get_baseline, "while measuring the baseline"), (self.build_objective, "before the first trial"),
                 (self.optimize, "during the trials"), (self.validate, "while validating the pick"),
                 (self.finish, "after the trials"))
        with interrupts_outside_storage():
            for step, during in steps:
                try:
                    step()
                except KeyboardInterrupt:  # optimize() says what became of the running trial itself
                    raise Interrupted(f"interrupted {during}: {counted(self.completed(), 'completed trial')} kept; "
                                      "run the same command to resume") from None

    def completed(self) -> int:
        if self.study is None:
            return 0
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    # --- the steps ---------------------------------------------------------------------------------
    def open(self) -> None:
        opts, echo = self.opts, self.echo
        self.prompts, self.storage, self.fingerprint, self.study, n_before = prepare_study(self.spec, opts, echo)
        echo(f"study {self.study.study_name} ({redact(opts.storage)}): {counted(n_before, 'trial')} so far, adding {opts.n_trials}")
        if self.spec.kind in ("random", "tiny-xl") or opts.clip_pretrained is None:
            echo("note: random weights (pipeline or CLIP model): speed is real, CLIP scores and losses are meaningless")

    def load(self) -> None:
        """The pipeline, the CLIP scorer, the evaluator and where images go."""
        opts = self.opts
        pin_cpu_threads(opts.device)
        use_cache_dir(compile_cache_for(opts.storage))  # a resumed run finds the graphs this one compiles
        try:
            pipe, self.settings = settings_for(self.spec, opts).load()  # compiled once per run in the compile mode
            scorer = ClipScorer(opts.clip_model, opts.clip_pretrained, opts.device, opts.dtype)
        except (pipelines.PipelineError, MetricError) as e:
            raise RunError(str(e)) from None
        self.pipe, self.xl = pipe, pipelines.is_xl(pipe)
        self.evaluator = Evaluator(pipe, scorer, self.prompts, self.settings, repeats=opts.repeats,
                                   progress=opts.progress, scored_repeats=opts.scored_repeats, exec=opts.exec_mode,
                                   score_batch=scoring_batch(self.study, opts, self.settings, len(self.prompts),
                                                             self.echo))
        self.directory = artifact_dir_for(opts.storage, opts.artifact_dir)
        try:
            self.store = artifact_store(self.directory)  # the baseline images always; trial images if --images-per-trial
        except OSError as e:  # pictures are not worth stopping a search for: the baseline's are regenerated
            self.echo(f"optimize-sd: warning: images not saved: artifact directory {self.directory}: "
                      f"{e.strerror or e}", err=True)

    def get_baseline(self) -> None:
        """The stored baseline (or one measured now), its images and the fidelity scorer holding them.
        No trial divides by the stored baseline's time: each times the untouched pipeline beside itself
        (paired rounds), since the machine's load may have changed since, or this may be another worker's GPU."""
        study, echo = self.study, self.echo

        def save(images, indices=None) -> None:
            self.save_images(images, study, BASELINE_PREFIX, None, indices)

        try:
            self.baseline, measured, ours = ensure_baseline(study, self.storage, self.evaluator, self.fingerprint, echo,
                                                      save)
            images = baseline_images(study, self.store, self.directory, self.evaluator, measured, echo, save)
        except storage_errors() as e:
            raise RunFailure(f"storage {redact(self.opts.storage)} failed: {first_line(e, self.opts.storage)}") from None
        b = self.baseline
        if ours:
            echo(f"baseline ({self.opts.exec_mode}): {1000 * b.time_per_image:.1f} ms/image (±{100 * b.spread:.0f}%), "
                 f"CLIP {b.clip_score:.3f}")
        else:  # stored by an earlier run or another worker: its time is not what any speedup here divides by
            echo(f"baseline ({self.opts.exec_mode}): CLIP {b.clip_score:.3f} (stored); each trial's speedup is against "
                 f"the baseline calls timed beside it on this device (stored time: {1000 * b.time_per_image:.1f} ms/image)")
        self.eager_time = None
        if self.opts.exec_mode != "eager":  # every speedup is also shown against the eager baseline
            eager = self.evaluator.time_eager(max(1, self.opts.repeats))
            self.eager_time = eager.best
            echo(f"eager baseline: {1000 * eager.best:.1f} ms/image (±{100 * eager.spread:.0f}%); "
                 f"{self.opts.exec_mode} baseline {eager.best / b.time_per_image:.2f}x faster")
        self.fidelity = fidelity_scorer(images, self.opts, echo)

    def build_objective(self) -> None:
        opts = self.opts
        space = SearchSpace(opts.methods, Context.of(self.pipe, opts.steps, self.settings.guidance, opts.scheduler))
        self.objective = Objective(self.evaluator, self.baseline, opts.goal, space, speed_gate=opts.speed_gate,
                                   fidelity=self.fidelity, eager_time=self.eager_time)
        self.key = search_params_key(self.spec, opts)
        self.worker = worker_label(opts)

    def optimize(self, n_trials: int | None = None) -> None:
        """``opts.n_trials`` trials (or ``n_trials``); Ctrl-C or SIGTERM is :class:`Interrupted`, a lost storage
        :class:`RunFailure`."""
        opts, study = self.opts, self.study
        n_trials = opts.n_trials if n_trials is None else n_trials
        self.bar = tqdm(total=n_trials, desc="trials", unit="trial", disable=not opts.progress, file=sys.stderr)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # our trial line reports failures
        # Ctrl-C or SIGTERM (run's handler): Optuna marks the running trial failed at once, instead of
        # leaving it for its heartbeat to go stale.
        try:
            study.optimize(self.run_trial, n_trials=n_trials, catch=(Exception,), callbacks=[self.after_trial],
                           gc_after_trial=True)
        except KeyboardInterrupt:
            self.bar.close()
            raise Interrupted(f"interrupted: {counted(self.completed(), 'completed trial')} kept, the running one marked "
                              f"failed{self.queue_interrupted()}; run the same command to resume") from None
        except Exception as e:
            cause = storage_cause(e)
            if cause is None:
                raise
            self.bar.close()
            raise RunFailure(f"storage {redact(opts.storage)} failed: {first_line(cause, opts.storage)}; completed trials are kept "
                             "and a running trial is retried when the study next runs") from None
        self.bar.close()

    def queue_interrupted(self) -> str:
        """Queue the interrupted trial's configuration again if it came from the queue (a warm start, a
        retry): the sampler would never propose it again, so it would stay failed for good. Within the
        retry limit, as for a killed run's trial, so a configuration that is interrupted every time (it
        hangs, say) does not come back for ever. What the line says about it ("" for a sampled one)."""
        if self.running is None:
            return ""
        try:
            trial = self.study._storage.get_trial(self.running)
            if trial.state != TrialState.FAIL or not from_queue(trial):
                return ""
            return _queued_again(self.storage.requeue(self.study, trial))
        except storage_errors() as e:  # the line still goes out
            return f" (not queued again: storage failed: {first_line(e, self.opts.storage)})"

    def validate(self) -> None:
        """Held-out re-validation of the pick (:mod:`optimize.app.validation`), stored on it and in
        search_params.json. A failure is a warning: the trials and the saved result stand."""
        opts, (best, _) = self.opts, self.result()
        if best is None:
            return
        n, note = planned_validation(opts, self.study)
        if note:
            self.echo(note)
        if not n:
            return
        self.evaluator.close()  # its graphs: the held-out measurement captures its own
        try:
            validator = validation.Validator(
                self.pipe, self.evaluator.scorer, load_heldout(opts.prompt_spec, opts.num_samples, n), self.settings,
                opts.goal, opts.device, repeats=opts.repeats, scored_repeats=opts.scored_repeats, exec_mode=opts.exec_mode,
                score_batch=self.evaluator.score_batch)

            def rescore(study):
                validator.close()  # its graphs: the trials capture theirs
                return self.rescore_gated(study)

            try:
                self.study, _ = validation.validate_pick(self.study, opts.goal, validator, self.write, rescore=rescore)
            finally:
                validator.close()
        except (Interrupted, RunFailure):  # while scoring again what the speed gate skipped: as during the trials
            raise
        except PromptsError as e:  # the default size, and the source has too few: nothing to warn about
            self.write(f"note: held-out validation skipped: {e}" if opts.validate is None
                       else f"optimize-sd: warning: held-out validation not run: {e}", err=opts.validate is not None)
            return
        except Exception as e:  # noqa: BLE001 - the search's result stands without it
            self.write(f"optimize-sd: warning: held-out validation failed: {type(e).__name__}: {first_line(e, opts.storage)}", err=True)
            return
        # finish() writes the result: the pick that held out of sample, with its validation

    def rescore_gated(self, study: optuna.Study) -> optuna.Study:
        """Once a pick is passed over (it broke the bound out of sample), score the configurations the speed
        gate skipped for being slower than it that are faster than the next best, fastest first, until one
        is feasible (it is then the next best) or :data:`RESCORE` were scored: the gate's reason is gone.
        Max mode only (in target mode the gate's bar is the target, which stands). Returns the study read
        afresh."""
        goal = self.opts.goal
        if goal.mode != "max" or not self.opts.speed_gate:
            return study
        tried: set[str] = set()
        for _ in range(RESCORE):
            best, _ = study_result(study, goal)
            floor = best.user_attrs[SPEEDUP] if best is not None else 1.0
            trials = study.get_trials(deepcopy=False)
            scored = {_params_key(t.params) for t in trials if t.state == TrialState.COMPLETE}
            skipped = [t for t in trials if t.state == TrialState.PRUNED and t.user_attrs.get(SPEEDUP, 0) > floor
                       and _params_key(t.params) not in scored | tried]
            if not skipped:
                break
            t = max(skipped, key=lambda t: t.user_attrs[SPEEDUP])
            if not tried:
                self.write(f"scoring what the speed gate skipped because of the pick passed over, fastest first, until "
                           f"one is feasible ({RESCORE} at most)")
            self.write(f"#{t.number} {t.user_attrs.get(CONFIG)} ({t.user_attrs[SPEEDUP]:.2f}x when skipped)")
            tried.add(_params_key(t.params))
            study.enqueue_trial(t.params, skip_if_exists=False)
            self.study = study
            self.optimize(1)
            study = validation.reloaded(self.study)
            after, _ = study_result(study, goal)
            if after is not None and after.number == study.trials[-1].number:
                break
        if tried:
            self.evaluator.close()  # its graphs: the held-out measurement captures its own
        return study

    def finish(self) -> None:
        """The study's result: written to search_params.json at the end of every run, whether or not a
        trial of this run became the best (the file may have been moved away since, ``--output`` be new,
        a write have failed), then the summary; "saved" only once that write succeeded."""
        opts, name = self.opts, self.study.study_name
        best, front = self.result()
        if best is not None:
            self.save_best(best, front)
        else:  # a pick written during the trials may have been passed over since: no longer a result
            self.drop_passed_over()
        self.echo(console.format_result(name, opts.goal, best, front, self.baseline))
        if self.unsaved:
            e = self.unsaved
            raise RunFailure(f"{opts.output} not updated: {_why(e)}; the old file is intact "
                             f"and the study keeps every trial (optimize-sd best --study {name} shows the best)")
        if best is not None:
            self.echo(f"saved to {opts.output} under {self.key!r}")

    # --- what the steps call -----------------------------------------------------------------------
    def drop_passed_over(self) -> None:
        passed_over = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                       if rejected_held_out(t)}
        try:
            gone = drop_passed_over(self.opts.output, self.study.study_name, passed_over)
        except (OSError, ParamsFileError) as e:
            self.echo(f"optimize-sd: warning: {self.opts.output} not updated: {_why(e)}", err=True)
            return
        for key in gone:
            self.echo(f"removed {key!r} from {self.opts.output}: its pick broke the bound out of sample and "
                      "the study has no other")

    def write(self, line: str, err: bool = False) -> None:
        """A line while the progress bar may be shown (tqdm clears the bar, the line goes out, it redraws)."""
        with tqdm.external_write_mode(file=sys.stderr if err else None):
            self.echo(line, err=err)

    def save_images(self, images, target, prefix: str, limit: int | None, indices=None) -> None:
        if self.store is None or not images or limit == 0:
            return
        try:
            upload_images(images[:limit], target, self.store, prefix, indices)
        except Exception as e:  # noqa: BLE001 - a trial's pictures are a convenience: never fail it over them
            self.echo(f"optimize-sd: warning: images not saved: {type(e).__name__}: {e}", err=True)

    def run_trial(self, trial: optuna.Trial) -> float:
        self.running = trial._trial_id
        trial.set_user_attr(WORKER, self.worker)
        try:
            value = self.objective(trial)
        except BaseException as e:
            # Drop the locals of the frames that failed (activations of an out-of-memory trial, say) now,
            # not whenever the exception object goes.
            traceback.clear_frames(e.__traceback__)
            raise
        self.save_images(self.objective.last_images, trial, trial_prefix(trial.number), self.opts.images_per_trial)
        self.objective.last_images = None
        return value

    def after_trial(self, study: optuna.Study, trial) -> None:
        self.running = None
        self.bar.update(1)
        self.write(console.trial_line(trial, self.opts.goal))
        self.note_load(trial)
        if trial.state == TrialState.FAIL:
            free_memory()
        best, front = self.result()
        if trial.state == TrialState.COMPLETE and best is not None and (
                best.number == trial.number or any(t.number == trial.number for t in front)):
            self.save_best(best, front)

    def note_load(self, trial) -> None:
        """One note per run once the untouched pipeline's time, beside this run's trials and when the study's
        baseline was measured, spans more than :data:`LOAD_SWING`: the machine's load changed (a shared CPU
        gave 220 to 4,763 ms/image for the same settings). Speedups are paired ratios and stay comparable
        across runs; times per image are not."""
        a = trial.user_attrs
        if BASELINE_TIME not in a or REUSED_FROM in a or self.baseline_times is None:
            return
        self.baseline_times.append(a[BASELINE_TIME])
        times = self.baseline_times + [self.baseline.time_per_image]
        if max(times) > LOAD_SWING * min(times):
            self.write(f"note: the untouched pipeline took {1000 * min(times):.0f} to {1000 * max(times):.0f} ms/image "
                       f"in this study (its stored baseline: {1000 * self.baseline.time_per_image:.0f} ms): the machine's "
                       "load changed; speedups are paired ratios (each trial's own baseline calls) and stay comparable, "
                       "times per image do not")
            self.baseline_times = None  # said once

    def result(self):
        return study_result(self.study, self.opts.goal)

    def entry(self, best, front) -> dict:
        return run_entry(best, front, spec=self.spec, opts=self.opts, settings=self.settings,
                         device=self.fingerprint.device, study_name=self.study.study_name, baseline=self.baseline)

    def save_best(self, best, front) -> None:
        """Write ``best`` (and the pareto front) to search_params.json. Other workers write theirs too:
        after each write the study's result is read again and written if it changed, so the last writer
        always leaves the study's result in the file, whatever order the workers' writes came in."""
        for _ in range(10):
            try:
                update_search_params(self.opts.output, self.key, self.entry(best, front))
            except (StorageError, OSError) as e:
                # disk full, read-only, the user's file invalid: the old file stays as it was (atomic
                # replace; an invalid one is never overwritten) and the study keeps the result
                self.unsaved = e
                self.write(f"optimize-sd: warning: {self.opts.output} not updated: {_why(e)}", err=True)
                return
            self.unsaved = None
            now, now_front = self.result()
            if now is None or [t.number for t in (now, *now_front)] == [t.number for t in (best, *front)]:
                return
            best, front = now, now_front
