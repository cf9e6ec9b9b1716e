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
from dataclasses import dataclass, replace
from typing import Any, Iterator

from optuna.trial import TrialState

from ..levers import Config, Context, InvalidConfig, accelerate
from ..measure.prompts import PromptsError, check_length
from ..runtime import pipelines
from ..runtime.text import shorten
from ..study.baseline import Baseline
from ..study.files import atomic_write
from ..study.record import DEFAULT_SEED, StudyError, StudyRecord, best_feasible, goal_of, is_feasible, open_study
from ..study.storage import StorageError
from .params_file import read_entry
from .settings import PipelineSettings, SettingsError


class GenerateError(ValueError):
    """Settings, params or an output no image can be generated from; the message is one line."""


@dataclass(frozen=True)
class Plan:
    """Everything one ``generate`` needs, resolved and checked before any model loads."""

    origin: str  # where the settings came from, for the messages
    settings: PipelineSettings
    params: dict[str, Any]
    config: Config
    notes: tuple[str, ...] = ()

    def __getattr__(self, name: str):  # plan.steps, plan.device, ...: the pipeline settings'
        if name != "settings" and name in PipelineSettings.__dataclass_fields__:
            return getattr(self.settings, name)
        raise AttributeError(name)


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


def _plan(origin: str, settings: PipelineSettings, params: Any) -> Plan:
    if not isinstance(params, dict):
        raise GenerateError(f"{origin}: params must be a JSON object, got {params!r}")
    try:
        config = Config.from_params(params)
        check = settings.guidance  # the default is unknown for a directory not loaded yet
        if check is None and settings.spec.is_xl is not None:
            check = pipelines.default_guidance(settings.spec.is_xl)
        config.validate(num_inference_steps=settings.steps, guidance_scale=check)
    except (InvalidConfig, TypeError) as e:
        raise GenerateError(f"{origin}: {e}") from None
    return Plan(origin, settings, dict(params), config, settings.notes)


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
    origin = f"study {study.study_name} trial #{trial.number}"
    try:
        settings = PipelineSettings.of_study(origin, fp, Baseline.load(study), device=device, seed=seed)
    except SettingsError as e:
        raise GenerateError(str(e)) from None
    plan = _plan(origin, settings, dict(trial.params))
    return replace(plan, notes=tuple(notes) + plan.notes)


def plan_from_params_file(path: str, key: str | None = None, seed: int | None = None,
                          device: str | None = None) -> Plan:
    """Settings and params of entry ``key`` of a ``search_params.json`` (its only entry if ``key`` is None)."""
    try:
        key, entry = read_entry(path, key)
    except StorageError as e:
        raise GenerateError(str(e)) from None
    origin = f"{path} [{key}]"
    try:
        settings = PipelineSettings.stored(origin, str(entry.pipe), entry.scheduler, entry.steps, entry.guidance,
                                           entry.height, entry.width, entry.dtype, device=device, exec_mode=entry.exec,
                                           seed=DEFAULT_SEED if seed is None else seed)
    except SettingsError as e:
        raise GenerateError(str(e)) from None
    return _plan(origin, settings, entry.params)


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
    settings = plan.settings if accelerated else replace(plan.settings, exec="eager")  # --baseline: the untouched one
    if settings.exec != "eager":
        yield f"running in {settings.exec} mode (UNet and text encoders replayed from CUDA graphs), as the configuration was timed"
    try:
        pipe, call = settings.load()
    except pipelines.PipelineError as e:
        raise GenerateError(str(e)) from None
    guidance, height, width = call.guidance, call.height, call.width
    try:
        config.validate(pipe, plan.steps, guidance)
    except InvalidConfig as e:
        raise GenerateError(f"{plan.origin}: {e}") from None
    with accelerate(pipe, config, seed=plan.seed, exec=settings.exec) as run:
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
