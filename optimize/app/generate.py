"""``optimize-sd generate``: images from a found configuration, with the settings it was found for.

The settings come from a study (its stored fingerprint: pipeline, scheduler, steps, guidance, size,
dtype, seed; the best feasible trial's params, or ``--trial N``) or from one entry of
``search_params.json``. Everything is checked before the model loads, so a bad entry costs one line.

Example:
    >>> plan = plan_from_params_file("search_params.json", "sd1.5:ddim:50:target2:0.02")  # doctest: +SKIP
    >>> for line in generate(plan, ["a red fox in the snow"], "fox.png"):                   # doctest: +SKIP
    ...     print(line)
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

from optuna.trial import TrialState

from ..runtime import pipelines
from ..levers import Config, Context, InvalidConfig, accelerate
from ..runtime.graphs import check_exec, compile_blocks
from ..study.baseline import Baseline
from ..study.files import atomic_write
from .params_file import read_entry
from ..measure.prompts import PromptsError, check_length
from ..runtime.text import shorten
from ..study.storage import StorageError
from ..study.record import DEFAULT_SEED, StudyError, StudyRecord, best_feasible, goal_of, is_feasible, open_study


class GenerateError(ValueError):
    """Settings, params or an output no image can be generated from; the message is one line."""


@dataclass(frozen=True)
class Plan:
    """Everything one ``generate`` needs, resolved and checked before any model loads."""

    origin: str  # where the settings came from, for the messages
    spec: pipelines.PipeSpec
    scheduler: str
    steps: int
    guidance: float | None  # None: the pipeline's default (7.5; SDXL 5.0)
    height: int | None  # None: the model's native size
    width: int | None
    dtype: str
    device: str
    seed: int
    params: dict[str, Any]
    config: Config
    notes: tuple[str, ...] = ()
    exec: str = "eager"  # the execution mode the configuration was found in (optimize.runtime.graphs)


def spec_from_source(source: str) -> pipelines.PipeSpec:
    """The pipe a study or entry was made with: ``random:<preset>``, ``tiny`` / ``tiny-xl``, a hub id or a directory."""
    try:
        if source.startswith("random:"):
            return pipelines.resolve_pipe(source.split(":", 1)[1], random_weights=True)
        spec = pipelines.resolve_pipe(source)
        pipelines.check_loadable(spec)
        return spec
    except pipelines.PipelineError as e:
        raise GenerateError(str(e)) from None


def _check_output(output: str) -> str:
    """The PIL format ``output``'s extension names; refused now rather than after the images are made."""
    from PIL import Image

    ext = os.path.splitext(output)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise GenerateError(f"-o {output}: unknown image type {ext or '(no extension)'!r}; use .png, .jpg or .webp")
    if os.path.isdir(output):
        raise GenerateError(f"-o {output} is a directory")
    return fmt


def _plan(origin: str, source: str, scheduler: str, steps: Any, guidance: Any, height: Any, width: Any,
          dtype: str, params: Any, seed: int, device: str | None, exec_mode: Any = None) -> Plan:
    if scheduler not in pipelines.SCHEDULERS:
        raise GenerateError(f"{origin}: unknown scheduler {scheduler!r} (known: {', '.join(pipelines.SCHEDULERS)})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise GenerateError(f"{origin}: steps must be a positive integer, got {steps!r}")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))):
        raise GenerateError(f"{origin}: guidance must be a number, got {guidance!r}")
    for side, value in (("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8):
            raise GenerateError(f"{origin}: {side} must be a positive multiple of 8, got {value!r}")
    if dtype not in pipelines.DTYPES:
        raise GenerateError(f"{origin}: unknown dtype {dtype!r} (known: {', '.join(pipelines.DTYPES)})")
    if not isinstance(params, dict):
        raise GenerateError(f"{origin}: params must be a JSON object, got {params!r}")
    try:
        spec = spec_from_source(source)
    except GenerateError as e:
        raise GenerateError(f"{origin}: {e}") from None
    try:
        config = Config.from_params(params)
        check = guidance  # the default is unknown for a directory not loaded yet
        if check is None and spec.is_xl is not None:
            check = pipelines.default_guidance(spec.is_xl)
        config.validate(num_inference_steps=steps, guidance_scale=check)
    except (InvalidConfig, TypeError) as e:
        raise GenerateError(f"{origin}: {e}") from None
    try:
        device = pipelines.resolve_device(device)
    except pipelines.PipelineError as e:
        raise GenerateError(str(e)) from None
    exec_mode = exec_mode or "eager"
    try:  # the configuration runs in the mode it was found and timed in
        check_exec(exec_mode, device)
    except ValueError as e:
        raise GenerateError(f"{origin}: found with --exec {exec_mode}: {e}") from None
    notes = []
    if dtype == "fp16" and device == "cpu":
        notes.append("note: fp16 does not run on the CPU: generating in fp32")
        dtype = "fp32"
    return Plan(origin, spec, scheduler, steps, None if guidance is None else float(guidance), height, width, dtype,
                device, seed, dict(params), config, tuple(notes), exec_mode)


def plan_from_study(storage_url: str, study_name: str | None = None, trial_number: int | None = None,
                    seed: int | None = None, device: str | None = None) -> Plan:
    """Settings of a study and params of its best feasible trial (or of trial ``trial_number``)."""
    try:
        study = open_study(storage_url, study_name)
    except StudyError as e:
        raise GenerateError(str(e)) from None
    record = StudyRecord.load(study)
    fp = record.fingerprint
    if not fp:
        raise GenerateError(f"study {study.study_name!r} stores no pipeline settings (no baseline was measured)")
    notes = []
    if trial_number is None:
        trial = best_feasible(study, goal_of(study))
        if trial is None:
            raise GenerateError(f"study {study.study_name!r} has no feasible trial yet; pick one with --trial N")
    else:
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        trial = trials.get(trial_number)
        if trial is None:
            raise GenerateError(f"study {study.study_name!r} has no trial #{trial_number} (trials 0..{len(trials) - 1})")
        if trial.state != TrialState.COMPLETE:
            state = {"FAIL": "failed", "RUNNING": "still running"}.get(trial.state.name, trial.state.name.lower())
            raise GenerateError(f"trial #{trial_number} of {study.study_name!r} is {state}, not complete")
        if not is_feasible(trial):
            notes.append(f"note: trial #{trial_number} is infeasible (outside the study's bounds)")
    baseline = Baseline.load(study)
    origin = f"study {study.study_name} trial #{trial.number}"
    plan = _plan(origin, str(fp.pipe), fp.scheduler, fp.steps, fp.guidance,
                 fp.height or (baseline.height if baseline else None),
                 fp.width or (baseline.width if baseline else None), fp.dtype, dict(trial.params),
                 fp.run_seed if seed is None else seed, device, fp.exec)
    return Plan(**{**plan.__dict__, "notes": tuple(notes) + plan.notes})


def plan_from_params_file(path: str, key: str | None = None, seed: int | None = None,
                          device: str | None = None) -> Plan:
    """Settings and params of entry ``key`` of a ``search_params.json`` (its only entry if ``key`` is None)."""
    try:
        key, entry = read_entry(path, key)
    except StorageError as e:
        raise GenerateError(str(e)) from None
    return _plan(f"{path} [{key}]", str(entry.pipe), entry.scheduler, entry.steps, entry.guidance, entry.height,
                 entry.width, entry.dtype, entry.params, DEFAULT_SEED if seed is None else seed, device, entry.exec)


def output_paths(output: str, count: int) -> list[str]:
    """``output`` itself for one image; ``stem-0.ext``, ``stem-1.ext``, ... for several."""
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{i}{ext}" for i in range(count)]


def _encode(image, fmt: str, info: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        meta = PngInfo()
        meta.add_text("optimize-sd", json.dumps(info, sort_keys=True))
        image.save(buf, format=fmt, pnginfo=meta)
    else:
        image.convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


def generate(plan: Plan, prompts: list[str], output: str, num_images: int = 1,
             accelerated: bool = True) -> Iterator[str]:
    """Load the pipeline, apply the plan's configuration, generate and write the images atomically.

    Prompt ``i`` is generated with seed ``plan.seed + i`` (as a study generates its ``i``-th prompt).
    Yields one line per step for the user.
    """
    import torch

    if not prompts or any(not p.strip() for p in prompts):
        raise GenerateError("give at least one non-empty prompt")
    try:
        for i, prompt in enumerate(prompts, 1):
            check_length(prompt, f"prompt {i}")
    except PromptsError as e:
        raise GenerateError(str(e)) from None
    fmt = _check_output(output)
    paths = iter(output_paths(output, len(prompts) * num_images))
    config = plan.config if accelerated else Config()
    yield from plan.notes
    runs = config.context(Context(steps=plan.steps, scheduler=plan.scheduler))  # the schedule lever's, if on
    reference = "" if (runs.steps, runs.scheduler) == (plan.steps, plan.scheduler) else \
        f" instead of the reference's {plan.scheduler}, {plan.steps} steps"
    yield (f"{plan.origin}: {config.label()} ({plan.spec.source}, {runs.scheduler}, {runs.steps} steps{reference}, "
           f"{plan.device})")
    try:
        pipe = pipelines.load_pipeline(plan.spec, plan.scheduler, plan.device, plan.dtype)
    except pipelines.PipelineError as e:
        raise GenerateError(str(e)) from None
    xl = pipelines.is_xl(pipe)
    guidance = plan.guidance if plan.guidance is not None else pipelines.default_guidance(xl)
    size = pipelines.native_size(pipe)
    height, width = plan.height or size, plan.width or size
    try:
        config.validate(pipe, plan.steps, guidance)
    except InvalidConfig as e:
        raise GenerateError(f"{plan.origin}: {e}") from None
    if plan.exec != "eager" and accelerated:
        yield f"running in {plan.exec} mode (UNet and text encoders replayed from CUDA graphs), as the configuration was timed"
        if plan.exec == "compile":
            compile_blocks(pipe.unet)
    with accelerate(pipe, config, seed=plan.seed, exec=plan.exec if accelerated else "eager") as run:
        for index, prompt in enumerate(prompts):
            seed = plan.seed + index
            start = time.perf_counter()
            images = run(
                prompt=prompt, num_images_per_prompt=num_images, num_inference_steps=plan.steps,
                guidance_scale=guidance, height=height, width=width,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images
            seconds = time.perf_counter() - start
            for image in images:
                path = next(paths)
                info = {"prompt": prompt, "seed": seed, "steps": runs.steps, "guidance": guidance,
                        "scheduler": runs.scheduler, "pipe": plan.spec.source, "config": config.label(),
                        "params": config.to_params(), "origin": plan.origin}
                atomic_write(path, _encode(image, fmt, info))
                yield f"wrote {path} ({width}x{height}, seed {seed}, {seconds:.1f} s for {len(images)} image(s)): {shorten(prompt)}"
