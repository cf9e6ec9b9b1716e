"""``optimize-sd``: the command line. Data flows one way: options -> study -> pipeline.

Every check that needs no model runs first, so bad input costs one clear line and a non-zero exit
before anything heavy loads.
"""

from __future__ import annotations

import json
import sys

import click

from ..runtime import pipelines
from ..measure import prompts as prompts_mod
from ..levers import METHODS
from ..study.baseline import Baseline
from .console import format_result, validation_text
from ..study.files import check_output
from .generate import GenerateError, generate, plan_from_params_file, plan_from_study
from ..runtime.graphs import check_exec
from ..measure.evaluator import default_rounds
from ..study.record import DEFAULT_BOUNDS
from ..measure.metrics import DEFAULT_MODEL, TESTBED_MODEL, TINY_MODEL, lpips_available, lpips_weights_path
from .params_file import add_validations, best_json, check_writable, drop_passed_over, read_search_params, update_pick
from ..runtime.pipelines import DTYPES, SCHEDULERS
from .report import measured_trials, write_report
from .runner import (Interrupted, RunError, RunFailure, RunOptions, left_out_note, missing_partner, run_search,
                     unavailable_methods)
from ..study.storage import DEFAULT_STORAGE, StorageError, check_storage_url, scrub
from ..study.record import CONFIG, DEFAULT_SEED, Goal, StudyError, goal_of, open_study, pick_study, study_result
from .validation import ValidationError, validate_study
from .workers import follow_launcher, launch

EXIT_USAGE = 2  # bad input, or a study that cannot be used: nothing was run
EXIT_FAILURE = 1  # a fault during a run (RunFailure), or ``best`` without a feasible trial
EXIT_INTERRUPTED = 130


# torch's generators take 64-bit seeds: a larger one failed only once the study existed
SEEDS = click.IntRange(-(2**63), 2**63 - 1)


class Failure(click.ClickException):
    exit_code = EXIT_USAGE


def _methods(value: str | None) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(m.strip().lower() for m in (value or ",".join(METHODS)).split(",") if m.strip()))
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise Failure(f"--methods: unknown method(s) {', '.join(bad) or '(none)'}; choose from {','.join(METHODS)}")
    return names


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="optimize-sd")
def cli():
    """Find the fastest training-free acceleration settings (sampling schedule, DeepCache, ToMe, T-GATE,
    layout, precision, VAE) for a Stable Diffusion pipeline that keep image quality (CLIP score, or PSNR,
    SSIM, LPIPS against the baseline images) within a bound."""


@cli.command()
@click.option("--pipe", default="sd1.5", show_default=True,
              help="Preset (sd1.5, sd2.1, sdxl), hub id, local diffusers dir, tiny (the trained testbed shipped in the package, "
                   "offline) or tiny-xl (offline, random weights).")
@click.option("--random-weights", is_flag=True,
              help="Build the preset's full-size architecture with random weights: real speed, meaningless quality.")
@click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default="ddim", show_default=True)
@click.option("--device", default=None, help="cuda, cuda:N or cpu  [default: cuda if available]")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="[default: fp16 on GPU, fp32 on CPU]")
@click.option("--steps", type=click.IntRange(1), default=None, help="Denoising steps  [default: 50; tiny: 20]")
@click.option("--guidance", type=float, default=None, help="CFG scale  [default: 7.5; SDXL 5.0]")
@click.option("--height", type=click.IntRange(8), default=None, help="[default: the model's native size]")
@click.option("--width", type=click.IntRange(8), default=None, help="[default: the model's native size]")
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True)
@click.option("--score-batch", type=click.IntRange(1), default=None,
              help="Prompts per pipeline call in the scoring pass, each with its own seed (timing stays at --batch-size); "
                   "stored with a new study's baseline, a resumed study keeps its own  [default: CPU 8; GPU 8 at "
                   "512x512, fewer for larger images]")
@click.option("--prompts", "prompt_spec", default=None,
              help="coco, coco:<dataset>, builtin, or a .txt/.json/.csv file  [default: coco; tiny: builtin]")
@click.option("--num-samples", type=int, default=None, help="Prompts to generate and score  [default: 32; tiny: 8]")
@click.option("--clip-model", default=None, help="open_clip model  [default: ViT-g-14; tiny: testbed-clip; tiny-xl: tiny-clip]")
@click.option("--clip-pretrained", default=None, help="open_clip weights, or none for random  [default: laion2b_s34b_b88k; tiny, random weights: none]")
@click.option("--repeats", type=click.IntRange(1), default=None,
              help="Paired rounds (a baseline call, then a configured call) timed per configuration before the scoring pass; "
                   "the speed gate judges them  [default: 3]")
@click.option("--exec", "exec_mode", type=click.Choice(["eager", "graphs", "compile"]), default=None,
              help="How the pipeline runs while the baseline and every trial are timed: eager, replayed from CUDA graphs "
                   "(the UNet one per step kind, the text encoders one per shape; the VAE decode stays eager), or compile: "
                   "graphs over the UNet's blocks each compiled for the baseline and every trial (kept so studies made "
                   "with it resume; the compile lever, searched in graphs mode, compiles the whole UNet per trial)  "
                   "[default: graphs on CUDA, eager on CPU]")
@click.option("--scored-repeats", type=click.IntRange(1), default=None,
              help="Paired rounds in all for a configuration that passes the speed gate and is scored: its speedup "
                   "can become the result, so it is timed more precisely  [default: on GPU 10 eager, 5 in a graph mode; "
                   "6 on CPU]")
@click.option("--mode", type=click.Choice(["target", "max", "pareto"]), default=None,
              help="target: least loss among configs at least --target-speedup fast; max: most speedup; pareto: the "
                   "front of speedup and loss (two objectives)  [default: target with --target-speedup, else max]")
@click.option("--target-speedup", type=float, default=None,
              help="Target mode: least loss among configs at least this fast. Without it: max speedup.")
@click.option("--loss-metric", type=click.Choice(["clip", "psnr", "ssim", "lpips"]), default="clip", show_default=True,
              help="What the bound applies to: clip (relative CLIP score loss), psnr (minimum PSNR in dB against the "
                   "baseline image of the same prompt and seed), ssim (1 - SSIM against it), lpips (LPIPS against it; "
                   "needs torchvision's AlexNet weights in the torch cache).")
@click.option("--max-loss", type=float, default=None,
              help="The bound: at most this loss; for --loss-metric psnr, at least this PSNR in dB  "
                   "[default: clip 0.02, psnr 25, ssim 0.15, lpips 0.15]")
@click.option("--confidence", type=float, default=None,
              help="Decide the constraints on the conservative end of each trial's paired interval at this level "
                   "(loss upper end <= bound, speedup lower end >= target) instead of the point estimates; part of "
                   "the study's name and settings  [default: off; intervals are shown at 0.9]")
@click.option("--validate", type=click.IntRange(0), default=None,
              help="After the trials, measure the pick again on this many held-out prompts (after the first "
                   "--num-samples) with fresh seeds; 0: off  [default: max(8, num-samples/4) when that costs at most "
                   "20% of the study, else skipped with a note]")
@click.option("--methods", default=None,
              help="Levers that may switch on: schedule (another solver and fewer steps than --scheduler and --steps), "
                   "deepcache, tome, tgate, layout (channels-last convolutions, fused QKV, the attention kernel), "
                   "precision (torchao int8 or fp8, searched only with compile; pip install 'optimize-sd[gpu]'), vae (SDXL's "
                   "VAE decoded in fp16), compile (the whole UNet under torch.compile, in graphs mode). "
                   "Naming one that cannot run on --device is refused  [default: all of them; those that cannot run "
                   "on --device are left out, said in one line]")
@click.option("--n-trials", type=click.IntRange(1), default=20, show_default=True, help="Trials to add in this run.")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True, help="Optuna storage URL.")
@click.option("--study", "study_name", default=None, help="[default: derived from model, scheduler, steps and goal]")
@click.option("--seed", type=SEEDS, default=DEFAULT_SEED, show_default=True)
@click.option("--output", default="search_params.json", show_default=True, type=click.Path(dir_okay=False))
@click.option("--heartbeat", type=click.IntRange(1), default=60, show_default=True,
              help="Seconds between trial heartbeats; a trial silent for twice that is retried.")
@click.option("--images-per-trial", type=click.IntRange(0), default=4, show_default=True,
              help="Images of each trial kept as artifacts for optuna-dashboard and the report (the baseline's "
                   "images, one per prompt, are always kept: trials are compared with them).")
@click.option("--artifact-dir", default=None,
              help="Where those images go  [default: beside the SQLite file, else studies/artifacts]")
@click.option("--speed-gate/--no-speed-gate", default=True, show_default=True,
              help="Skip scoring a configuration whose timed repeats show it too slow for the goal (needs --repeats >= 1).")
@click.option("--warm-start/--no-warm-start", default=True, show_default=True,
              help="Start a new study with known-good configurations, each lever alone: DPM++ at two and three "
                   "fifths of --steps, DeepCache N=3 and N=5 (branch 0), on a GPU the compiled UNet.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Worker processes on --device searching one study; --n-trials is split between them.")
@click.option("--gpus", default=None,
              help="One worker per GPU on one study: indices (0,1,2,3) or all. Several machines join a study "
                   "by running the same command with one --storage postgresql://...")
@click.option("--worker-index", type=click.IntRange(0), default=None, hidden=True)
def run(**o):
    """Search acceleration settings; running the same command again resumes the study."""
    spec, opts = check_run_options(o)
    if len(opts.devices) > 1:
        # the workers search what the launcher kept (and say nothing again about what it left out)
        kept = {**o, "methods": ",".join(opts.methods)}
        code = launch(spec, opts, lambda device, n, index: worker_argv(kept, device, n, index), echo=click.echo)
        if not code:
            _validate_launched(spec, opts)
        sys.exit(code)
    if o["worker_index"] is not None:
        follow_launcher()
    run_search(spec, opts, echo=click.echo)


_LAUNCHER_ONLY = ("device", "n_trials", "progress", "workers", "gpus", "worker_index", "validate")


def worker_argv(o: dict, device: str, n_trials: int, index: int) -> list[str]:
    """The ``optimize-sd run`` arguments of one worker: this command's, with its own device and share."""
    argv = ["run"]
    for param in run.params:
        if not isinstance(param, click.Option) or param.name in _LAUNCHER_ONLY:
            continue
        value = o[param.name]
        name = max(param.opts, key=len)
        if param.is_flag and param.secondary_opts:
            argv.append(name if value else max(param.secondary_opts, key=len))
        elif param.is_flag:
            if value:
                argv.append(name)
        elif value is not None:
            argv += [name, str(value)]
    # the launcher validates the pick once all workers are done (_validate_launched)
    return argv + ["--device", device, "--n-trials", str(n_trials), "--no-progress", "--worker-index", str(index),
                   "--validate", "0"]


def _validate_launched(spec, opts: RunOptions) -> None:
    """After the workers of ``--workers`` / ``--gpus``: the held-out validation of the study's pick, here
    on the first device (the workers were told not to: it would run once per worker)."""
    from .runner import planned_validation, study_name_for

    name = opts.study_name or study_name_for(spec, opts)
    study = pick_study(opts.storage, name)
    n, note = planned_validation(opts, study)
    if note:
        click.echo(note)
    if not n or study_result(study, opts.goal)[0] is None:
        return
    try:
        study, results = validate_study(opts.storage, name, n=n, device=opts.devices[0], prompts=opts.prompt_spec,
                                        repeats=opts.repeats, scored_repeats=opts.scored_repeats, echo=click.echo)
    except ValidationError as e:
        click.echo(f"optimize-sd: warning: held-out validation failed: {e}", err=True)
        return
    _report_validations(study, results, opts.output)


def _devices(o: dict) -> tuple[str, ...]:
    """The workers' devices: ``--gpus`` (cuda:N each) or ``--workers`` times ``--device``; () for one process."""
    if o["gpus"] is None:
        return (o["device"] or pipelines.resolve_device(None),) * o["workers"] if o["workers"] > 1 else ()
    if o["device"] is not None or o["workers"] != 1:
        raise Failure("--gpus chooses the devices and the number of workers: leave out --device and --workers")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise Failure(f"--gpus {o['gpus']}: no CUDA GPU is available here (use --workers N --device cpu)")
    if o["gpus"].strip().lower() == "all":
        indices = list(range(count))
    else:
        try:
            indices = [int(x) for x in o["gpus"].split(",") if x.strip()]
        except ValueError:
            raise Failure(f"--gpus {o['gpus']!r}: use GPU indices such as 0,1,2,3, or all") from None
        bad = [i for i in indices if not 0 <= i < count]
        if not indices or bad or len(set(indices)) != len(indices):
            raise Failure(f"--gpus {o['gpus']!r}: use distinct indices from 0 to {count - 1}, or all")
    return tuple(f"cuda:{i}" for i in indices)


def _goal(o: dict) -> Goal:
    mode = o["mode"] or ("target" if o["target_speedup"] is not None else "max")
    metric = o["loss_metric"]
    try:
        goal = Goal(mode, o["target_speedup"], o["max_loss"] if o["max_loss"] is not None else DEFAULT_BOUNDS[metric],
                    metric, o["confidence"])
    except ValueError as e:
        raise Failure(str(e)) from None
    if metric == "lpips" and not lpips_available():
        raise Failure(f"--loss-metric lpips needs torchvision's AlexNet weights at {lpips_weights_path()} "
                      "(copy alexnet-owt-7be5be79.pth there, or set TORCH_HOME); nothing is downloaded during a run")
    return goal


def _check_inputs(o: dict, prompt_spec: str, num_samples: int, methods: tuple[str, ...]) -> None:
    """The prompts, the sizes, the storage URL and the output file, before anything loads."""
    if num_samples < 1:
        raise Failure("--num-samples must be at least 1")
    for side in ("height", "width"):
        if o[side] is not None and o[side] % 8:
            raise Failure(f"--{side} must be a multiple of 8, got {o[side]}")
    if o["study_name"] is not None and not o["study_name"].strip():
        raise Failure("--study must not be empty (leave it out for the name derived from model, scheduler, steps "
                      "and goal)")
    try:
        prompts_mod.check_spec(prompt_spec)
        check_storage_url(o["storage"])
        read_search_params(o["output"])  # an unreadable file is found now, not after the first good trial
        check_writable(o["output"])  # and a read-only one, or an unwritable directory, now, not after the search
    except (prompts_mod.PromptsError, StorageError) as e:
        raise Failure(str(e)) from None
    if o["guidance"] is not None and o["guidance"] <= 1 and "tgate" in methods:
        raise Failure("T-GATE needs --guidance > 1 (or leave tgate out of --methods)")


def check_run_options(o: dict) -> tuple[pipelines.PipeSpec, RunOptions]:
    """All checks of ``run``'s options that need no model; the resolved pipe and a :class:`RunOptions`.

    ``o`` is ``run``'s parameters by name (``run.make_context("run", argv).params``); bad input is one
    :class:`Failure` line.
    """
    try:
        spec = pipelines.resolve_pipe(o["pipe"], random_weights=o["random_weights"])
        pipelines.check_loadable(spec)  # before the study is created: a pipeline that cannot load leaves none
    except pipelines.PipelineError as e:
        raise Failure(str(e)) from None
    tiny = spec.kind in pipelines.TINY
    goal = _goal(o)
    methods = _methods(o["methods"])
    devices = _devices(o)
    try:
        device = pipelines.resolve_device(devices[0] if devices else o["device"])
    except pipelines.PipelineError as e:
        raise Failure(str(e)) from None
    dtype = o["dtype"] or ("fp16" if device.startswith("cuda") else "fp32")
    if dtype == "fp16" and device == "cpu":
        raise Failure("--dtype fp16 is not supported on CPU (use fp32 or bf16)")
    prompt_spec = o["prompt_spec"] or ("builtin" if tiny else "coco")
    if spec.kind == "tiny" and prompt_spec == "builtin":
        prompt_spec = "testbed"  # the trained testbed's own held-out captions
    num_samples = o["num_samples"] if o["num_samples"] is not None else (8 if tiny else 32)
    _check_inputs(o, prompt_spec, num_samples, methods)
    # Random-weight pipelines get a random-weight scorer of the real size: its cost is real, its scores not.
    default_clip = (TESTBED_MODEL if spec.kind == "tiny" else TINY_MODEL if tiny
                    else (DEFAULT_MODEL[0], None if spec.kind == "random" else DEFAULT_MODEL[1]))
    gpu = device.startswith("cuda")
    exec_mode = o["exec_mode"] or ("graphs" if gpu else "eager")
    try:
        check_exec(exec_mode, device)
    except ValueError as e:
        raise Failure(str(e)) from None
    rounds = default_rounds(device, exec_mode)
    methods, notes = _methods_here(methods, device, explicit=o["methods"] is not None)
    opts = RunOptions(
        scheduler=o["scheduler"], device=device, dtype=dtype, steps=o["steps"] or (20 if tiny else 50),
        guidance=o["guidance"], height=o["height"], width=o["width"], batch_size=o["batch_size"],
        prompt_spec=prompt_spec, num_samples=num_samples, clip_model=o["clip_model"] or default_clip[0],
        clip_pretrained=_pretrained(o["clip_pretrained"], default_clip[1] if o["clip_model"] is None else None),
        repeats=o["repeats"] if o["repeats"] is not None else rounds[0],
        scored_repeats=o["scored_repeats"] if o["scored_repeats"] is not None else rounds[1],
        goal=goal, methods=methods, n_trials=o["n_trials"], storage=o["storage"], study_name=o["study_name"],
        seed=o["seed"], output=o["output"], heartbeat=o["heartbeat"], progress=o["progress"],
        warm_start=o["warm_start"], speed_gate=o["speed_gate"], images_per_trial=o["images_per_trial"], artifact_dir=o["artifact_dir"],
        devices=devices, exec_mode=exec_mode, validate=o["validate"], score_batch=o["score_batch"], notes=notes,
    )
    _check_trust(opts)
    return spec, opts


def _methods_here(methods: tuple[str, ...], device: str, explicit: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The levers a run searches on ``device`` and the line saying which of the default ones it left out;
    one named in --methods that cannot run there is refused (the user asked for it by name)."""
    if explicit:
        for name in methods:
            needed = missing_partner(name, methods)
            if needed is not None:
                raise Failure(f"--methods: {name} is searched only together with {needed}: add {needed} to --methods")
    left_out = unavailable_methods(methods, device, explicit)
    if left_out and explicit:
        raise Failure("--methods: " + "; ".join(f"{n} cannot run on {device}: {r}" for n, r in left_out.items())
                      + " (leave it out of --methods)")
    return tuple(m for m in methods if m not in left_out), (left_out_note(left_out, device),) if left_out else ()


def _check_trust(opts: RunOptions) -> None:
    """--confidence needs intervals (2 prompts; in target mode 2 timed calls); an explicit --validate
    needs its held-out prompts (a file's or the built-in ones: cheap to check now; COCO has 5000)."""
    goal = opts.goal
    if goal.confidence is not None and opts.num_samples < 2:
        raise Failure("--confidence needs at least 2 prompts (--num-samples 2): an interval needs 2 values")
    if goal.confidence is not None and goal.mode == "target" and max(opts.repeats, opts.scored_repeats) < 2:
        raise Failure("--confidence with --target-speedup needs 2 paired rounds per configuration: --scored-repeats 2 "
                      "or more")
    if opts.validate and not opts.prompt_spec.startswith("coco"):
        try:
            prompts_mod.load_heldout(opts.prompt_spec, opts.num_samples, opts.validate)
        except prompts_mod.PromptsError as e:
            raise Failure(str(e)) from None


def _pretrained(value: str | None, default: str | None) -> str | None:
    if value is None:
        return default
    return None if value.lower() in ("none", "random", "") else value


@cli.command()
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--study", "study_name", default=None, help="[default: the only study, or the most recently run]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def best(storage, study_name, as_json):
    """Print the best feasible trial of a study; of a pareto study, its feasible Pareto front (one line
    per trial) and the fastest of it."""
    study = pick_study(storage, study_name)
    goal = goal_of(study)
    trial, front = study_result(study, goal)
    baseline = Baseline.load(study)
    if as_json:
        click.echo(json.dumps(best_json(study.study_name, goal, trial, front, baseline), indent=2))
    else:
        click.echo(format_result(study.study_name, goal, trial, front, baseline))
    if trial is None:
        sys.exit(EXIT_FAILURE)


@cli.command("validate")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--study", "study_name", default=None, help="[default: the only study, or the most recently run]")
@click.option("-n", "--num-prompts", type=click.IntRange(1), default=None,
              help="Held-out prompts (after the study's --num-samples)  [default: max(8, num-samples/4)]")
@click.option("--trial", "trial_number", type=click.IntRange(0), default=None,
              help="Validate this trial  [default: the best feasible; pareto study: the fastest feasible]")
@click.option("--front", is_flag=True, help="Validate every trial of the feasible Pareto front.")
@click.option("--prompts", "prompt_spec", default=None,
              help="The run's --prompts  [default: as the study stored it]")
@click.option("--device", default=None, help="cuda, cuda:N or cpu  [default: cuda if available]")
@click.option("--repeats", type=click.IntRange(1), default=None, help="As for run  [default: 3]")
@click.option("--scored-repeats", type=click.IntRange(1), default=None, help="As for run  [default: on GPU 10 eager, 5 in a graph mode; 6 on CPU]")
@click.option("--output", default="search_params.json", show_default=True, type=click.Path(dir_okay=False),
              help="Add the result to this file's entries of the study's trials (none is created).")
def validate_command(storage, study_name, num_prompts, trial_number, front, prompt_spec, device, repeats,
                     scored_repeats, output):
    """Measure a study's pick (or its front) again on held-out prompts with fresh seeds, with the
    pipeline and settings the study was made with. A pick that breaks the study's bound out of sample is
    passed over: the next best is validated in its place (three in all at most). Exit 1 if what was
    validated (the pick in the end) breaks the bound or does not reproduce its speedup out of sample."""
    try:
        study, results = validate_study(storage, study_name, n=num_prompts, trial_number=trial_number, front=front,
                                        device=device, prompts=prompt_spec, repeats=repeats,
                                        scored_repeats=scored_repeats, echo=click.echo)
    except ValidationError as e:
        raise Failure(str(e)) from None
    if not _report_validations(study, results, output, pick=trial_number is None and not front):
        sys.exit(EXIT_FAILURE)


def _report_validations(study, results: dict, output: str, pick: bool = True) -> bool:
    """One line per validated trial, the result added to ``output``; where the pick was validated (``pick``),
    ``output``'s entries of the study hold its pick now (one that broke the bound is passed over). Whether
    what was validated held the bound and reproduced its speedup (``pick``: the last one, the pick in the end)."""
    goal = goal_of(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number, v in results.items():
        click.echo(f"#{number} {trials[number].user_attrs.get(CONFIG, '?')}: {validation_text(goal, v)}")
    try:
        keys = add_validations(output, study.study_name, {k: v.summary() for k, v in results.items()})
        best, front = study_result(study, goal)
        if pick and best is not None:
            keys += update_pick(output, study.study_name, best, front, goal)
        elif pick:  # every candidate broke the bound and the study has no other pick
            for key in drop_passed_over(output, study.study_name, {n for n, v in results.items() if not v.within_bound}):
                click.echo(f"removed {key!r} from {output}: its pick broke the bound out of sample and the study "
                           "has no other")
                keys = [k for k in keys if k != key]
    except (StorageError, OSError) as e:
        click.echo(f"optimize-sd: warning: {output} not updated: {e}", err=True)
        keys = []
    for key in sorted(set(keys)):
        click.echo(f"added to {output} under {key!r}")
    judged = list(results.values())[-1:] if pick else results.values()
    return all(v.within_bound and v.speedup_reproduced is not False for v in judged)


@cli.command("report")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--study", "study_name", default=None, help="[default: the only study, or the most recently run]")
@click.option("-o", "--output", default="report.html", show_default=True, type=click.Path(dir_okay=False))
@click.option("--top", type=click.IntRange(1), default=10, show_default=True, help="Trials in the table.")
@click.option("--artifact-dir", default=None, help="Where run stored the images  [default: as run chose it for this storage]")
def report_command(storage, study_name, output, top, artifact_dir):
    """Write a self-contained HTML report of a study: Pareto plot, history, importances, images of the
    baseline, the best and Pareto trials, top trials."""
    try:
        check_output(output, "-o")
        study = open_study(storage, study_name)
        write_report(study, output, storage, top, artifact_dir)
    except (StudyError, OSError) as e:
        raise Failure(str(e)) from None
    n = len(measured_trials(study))
    click.echo(f"wrote {output} (study {study.study_name}, {n} completed trial{'s' * (n != 1)})")


@cli.command("generate")
@click.argument("prompts", nargs=-1, required=True)
@click.option("-o", "--output", default="out.png", show_default=True, type=click.Path(dir_okay=False),
              help="Image file; with several images, NAME-0.png, NAME-1.png, ...")
@click.option("--storage", default=None, help=f"Optuna storage URL  [default: {DEFAULT_STORAGE}]")
@click.option("--study", "study_name", default=None, help="[default: the only study, or the most recently run]")
@click.option("--trial", "trial_number", type=click.IntRange(0), default=None,
              help="Use this trial's params  [default: the best feasible trial; pareto study: the fastest feasible]")
@click.option("--params", "params_file", default=None, type=click.Path(dir_okay=False),
              help="Take the settings from this search_params.json instead of a study.")
@click.option("--key", default=None, help="Entry of --params  [default: its only entry]")
@click.option("--seed", type=SEEDS, default=None, help="[default: the study's seed; 42 with --params]")
@click.option("--num-images", type=click.IntRange(1), default=1, show_default=True, help="Images per prompt.")
@click.option("--device", default=None, help="cuda, cuda:N or cpu  [default: cuda if available]")
@click.option("--baseline", "no_accel", is_flag=True, help="Generate without the acceleration, for comparison.")
def generate_command(prompts, output, storage, study_name, trial_number, params_file, key, seed, num_images, device,
                     no_accel):
    """Generate images with a study's best (or chosen) settings applied."""
    try:
        check_output(output, "-o")  # before any model loads
        if params_file is not None:
            if storage is not None or study_name is not None or trial_number is not None:
                raise GenerateError("--params takes the settings from the file: leave out --storage, --study and --trial")
            plan = plan_from_params_file(params_file, key, seed=seed, device=device)
        else:
            if key is not None:
                raise GenerateError("--key selects an entry of --params")
            plan = plan_from_study(storage or DEFAULT_STORAGE, study_name, trial_number, seed=seed, device=device)
        for line in generate(plan, list(prompts), output, num_images=num_images, accelerated=not no_accel):
            click.echo(line)
    except (GenerateError, OSError) as e:
        raise Failure(str(e)) from None


@cli.command("dashboard")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--artifact-dir", default=None, help="[default: as run chose it for this storage]")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port")
def dashboard_command(storage, artifact_dir, host, port):
    """Start optuna-dashboard on a study storage, with the trials' images (read-only: nothing is created
    or written, a missing SQLite file is refused)."""
    from .dashboard import DashboardError, serve

    try:
        serve(storage, artifact_dir, host, port, click.echo)
    except (StorageError, DashboardError) as e:
        raise Failure(str(e)) from None


def main(argv=None) -> None:
    """Entry point: click's errors and the library's become one line on stderr and an exit code."""
    import warnings

    # Optuna flags the features this tool relies on (heartbeat, grouped TPE) as experimental on every use.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*experimental.*")
    argv = sys.argv[1:] if argv is None else list(argv)
    global _STORAGE_URLS
    _STORAGE_URLS = _storage_urls(argv)
    try:
        code = cli.main(args=argv, prog_name="optimize-sd", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("optimize-sd: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Interrupted as e:  # the run said what it kept
        click.echo(str(e), err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except RunFailure as e:
        _fail(str(e), EXIT_FAILURE)
    except (RunError, StudyError) as e:
        _fail(str(e), EXIT_USAGE)
    sys.exit(code if isinstance(code, int) else 0)


_STORAGE_URLS: list[str] = []  # this command's --storage values, whose passwords no error line may show


def _storage_urls(argv: list[str]) -> list[str]:
    urls = [v for flag, v in zip(argv, argv[1:]) if flag == "--storage"]
    return urls + [a.partition("=")[2] for a in argv if a.startswith("--storage=")]


def _fail(message: str, code: int) -> None:
    # Every message redacts the URL it names; this also catches a driver's words that quote a password.
    for url in _STORAGE_URLS:
        message = scrub(message, url)
    click.echo(f"optimize-sd: error: {message}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
