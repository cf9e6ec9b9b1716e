"""A pipeline's settings, resolved one way wherever they come from, and the one way a pipeline is
loaded with them.

Three commands need the same thing: ``run`` (from its options), ``validate`` and ``generate --study``
(from the fingerprint a study stored with its baseline), and ``generate --params`` (from an entry of
search_params.json). :class:`PipelineSettings` checks stored values before anything loads (a file
a user edited is input like any other), and :meth:`PipelineSettings.load` loads the pipeline, fills in
what the model decides (its native size, its default guidance) and compiles it in the compile mode.

Example:
    >>> s = PipelineSettings.stored("search_params.json [k]", "tiny", "ddim", 20, None, None, None, "fp32",
    ...                             seed=42, device="cpu")
    >>> s.spec.kind, s.steps, s.exec
    ('tiny', 20, 'eager')
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..measure.evaluator import GenerationSettings
from ..runtime import pipelines
from ..runtime.graphs import check_exec, compile_blocks


class SettingsError(ValueError):
    """Stored settings that cannot be used; the message names where they came from."""


@dataclass(frozen=True)
class PipelineSettings:
    """What a pipeline is loaded and called with."""

    spec: pipelines.PipeSpec
    scheduler: str
    steps: int
    guidance: float | None  # None: the pipeline's default (7.5; SDXL 5.0)
    height: int | None  # None: the model's native size
    width: int | None
    dtype: str
    device: str
    seed: int
    batch_size: int = 1
    exec: str = "eager"  # how the UNet runs (optimize.runtime.graphs)
    notes: tuple[str, ...] = ()  # what was changed on the way, for the user

    @classmethod
    def stored(cls, origin: str, source: str, scheduler: Any, steps: Any, guidance: Any, height: Any, width: Any,
               dtype: Any, *, seed: int, device: str | None, exec_mode: Any = None, batch_size: Any = 1
               ) -> "PipelineSettings":
        """Settings read back from a study or a file (``origin`` names which), checked before anything loads."""
        if scheduler not in pipelines.SCHEDULERS:
            raise SettingsError(f"{origin}: unknown scheduler {scheduler!r} (known: {', '.join(pipelines.SCHEDULERS)})")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SettingsError(f"{origin}: steps must be a positive integer, got {steps!r}")
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))):
            raise SettingsError(f"{origin}: guidance must be a number, got {guidance!r}")
        for side, value in (("height", height), ("width", width)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8):
                raise SettingsError(f"{origin}: {side} must be a positive multiple of 8, got {value!r}")
        if dtype not in pipelines.DTYPES:
            raise SettingsError(f"{origin}: unknown dtype {dtype!r} (known: {', '.join(pipelines.DTYPES)})")
        try:
            spec = spec_from_source(source)
            device = pipelines.resolve_device(device)
        except pipelines.PipelineError as e:
            raise SettingsError(f"{origin}: {e}") from None
        exec_mode = exec_mode or "eager"
        try:  # a configuration runs in the mode it was found and timed in
            check_exec(exec_mode, device)
        except ValueError as e:
            raise SettingsError(f"{origin}: found with --exec {exec_mode}: {e}") from None
        notes = ()
        if dtype == "fp16" and device == "cpu":
            notes, dtype = ("note: fp16 does not run on the CPU: generating in fp32",), "fp32"
        return cls(spec, scheduler, steps, None if guidance is None else float(guidance), height, width, dtype, device,
                   seed, batch_size or 1, exec_mode, notes)

    @classmethod
    def of_study(cls, origin: str, fingerprint, baseline, *, device: str | None, seed: int | None = None
                 ) -> "PipelineSettings":
        """The settings a study's baseline was measured with (its fingerprint; the size from the baseline
        where the run left it to the model)."""
        fp = fingerprint
        return cls.stored(origin, str(fp.pipe), fp.scheduler, fp.steps, fp.guidance,
                          fp.height or (baseline.height if baseline else None),
                          fp.width or (baseline.width if baseline else None), fp.dtype,
                          seed=fp.run_seed if seed is None else seed, device=device, exec_mode=fp.exec,
                          batch_size=fp.batch_size)

    def with_seed(self, seed: int) -> "PipelineSettings":
        return replace(self, seed=seed)

    def load(self):
        """The pipeline and the :class:`GenerationSettings` every call uses. Raises
        :class:`optimize.runtime.pipelines.PipelineError`."""
        pipe = pipelines.load_pipeline(self.spec, self.scheduler, self.device, self.dtype)
        xl, size = pipelines.is_xl(pipe), pipelines.native_size(pipe)
        generation = GenerationSettings(
            steps=self.steps, guidance=self.guidance if self.guidance is not None else pipelines.default_guidance(xl),
            height=self.height or size, width=self.width or size, batch_size=self.batch_size, seed=self.seed)
        if self.exec == "compile":  # once per loaded pipeline, reused by every configuration; graphs on top
            compile_blocks(pipe.unet)
        return pipe, generation


def spec_from_source(source: str) -> pipelines.PipeSpec:
    """The pipe a study or entry was made with: ``random:<preset>``, ``tiny`` / ``tiny-xl``, a hub id or a directory."""
    if source.startswith("random:"):
        return pipelines.resolve_pipe(source.split(":", 1)[1], random_weights=True)
    spec = pipelines.resolve_pipe(source)
    pipelines.check_loadable(spec)
    return spec
