"""Apply a :class:`Config` to a loaded pipeline, call it, and remove it exactly.

:class:`Accelerated` composes the levers that are on; it knows none of them. It puts the UNet's
own forward behind a :class:`~optimize.runtime.graphs.Step` first, where the levers decide each
step's kind before the forward runs and may replace what computes it (a compiled forward). In a
graph mode it installs the UNet's graphs next (so the levers wrap them: DeepCache keeps them as the
UNet's forward, and the levers' Python runs at capture only) and asks the levers, before every UNet
step, which kind of step comes, what state they hand between steps and which generators they draw from.

Example:
    >>> with accelerate(pipe, {"deepcache": True, "deepcache.cache_interval": 3}) as fast:   # doctest: +SKIP
    ...     image = fast("a red fox in the snow", num_inference_steps=50).images[0]
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Mapping

from ..runtime.graphs import EXEC_MODES, PipelineGraphs, Step, StepGraphs
from .base import Applied, InvalidConfig
from .config import Config


class Accelerated:
    """A pipeline with a :class:`Config` applied. Call it like the pipeline; use it as a context manager.

    Every call starts from a clean state: each lever resets what the previous call left behind
    (T-GATE's per-layer caches, DeepCache's cached features, ToMe's random generator). Without that,
    the second call of a configuration reuses tensors from the end of the first call (where T-GATE has
    halved the batch) and crashes, or differs from the first call.
    """

    def __init__(self, pipe, config: Config, seed: int = 0, exec: str = "eager", graph_backend=None,
                 pipeline_graphs: PipelineGraphs | None = None):
        if exec not in EXEC_MODES:
            raise InvalidConfig(f"exec must be one of {', '.join(EXEC_MODES)}, got {exec!r}")
        self.pipe = pipe
        self.config = config
        self.seed = seed
        self.exec = exec
        self.graph_backend = graph_backend
        self.applied: dict[str, Applied] | None = None  # by lever name, in registry order, while applied
        self.graphs: StepGraphs | None = None
        self.step: Step | None = None  # the UNet's own forward behind one indirection, while applied
        # graph modes: the text encoders' graphs and the host schedule; shared when given (a study's), else own
        self._shared_pipeline_graphs = pipeline_graphs is not None
        self.pipeline_graphs = pipeline_graphs
        self._pipeline_installed = False

    # -- life cycle ------------------------------------------------------------------------------
    def apply(self) -> "Accelerated":
        if self.applied is not None:
            raise RuntimeError("configuration already applied")  # DeepCache recurses if enabled twice
        if getattr(self.pipe, "_optimize_sd_applied", False):
            raise RuntimeError("another configuration is applied to this pipeline; remove it first")
        pipe = self.pipe
        if self.exec != "eager" and pipe.device.type != "cuda" and self.graph_backend is None:
            raise InvalidConfig(f"exec {self.exec!r} needs the pipeline on a CUDA device (it is on {pipe.device})")
        self.config.validate(pipe)
        pipe._optimize_sd_applied = True
        self.applied = {}
        try:
            # beneath everything the levers and the graphs put around the UNet: the levers decide each
            # step's kind there, and may swap what computes the step (a compiled forward)
            self.step = Step(pipe.unet, decide=self._step_kind).install()
            if self.exec != "eager":
                self.graphs = StepGraphs(pipe.unet, kind=self._step_kind, slots=self._slots,
                                         generators=self._generators, backend=self.graph_backend).install()
                if self.pipeline_graphs is None:
                    self.pipeline_graphs = PipelineGraphs(pipe, backend=self.graph_backend)
                self.pipeline_graphs.install()
                self._pipeline_installed = True
            for lever, params in self.config.items():
                self.applied[lever.name] = lever.apply(pipe, params, dict(self.applied))
            compute = self.step.own
            for applied in self.applied.values():
                compute = applied.step(compute)
            self.step.compute = compute
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Undo everything :meth:`apply` did; safe to call twice or after a failed apply."""
        if self.applied is None:
            return
        failed = None
        try:
            for applied in reversed(list(self.applied.values())):  # last applied, first removed
                try:
                    applied.remove()
                except Exception as e:  # noqa: BLE001 - the others are still removed; the first failure is raised
                    failed = failed or e
            if failed is not None:
                raise failed
        finally:
            self.pipe.__dict__.pop("_optimize_sd_applied", None)
            if self.graphs is not None:
                self.graphs.close()
            if self._pipeline_installed:
                if self._shared_pipeline_graphs:
                    self.pipeline_graphs.uninstall()
                else:
                    self.pipeline_graphs.close()
                    self.pipeline_graphs = None
                self._pipeline_installed = False
            if self.step is not None:
                self.step.uninstall()
            self.applied = None
            self.graphs = None
            self.step = None

    def __enter__(self) -> "Accelerated":
        return self.apply() if self.applied is None else self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- calls -----------------------------------------------------------------------------------
    def reset_state(self) -> None:
        """Forget everything the previous call left behind."""
        for applied in self.applied.values():
            applied.reset(self.seed)

    def __call__(self, *args, **kwargs):
        if self.applied is None:
            raise RuntimeError("configuration is not applied (use it as a context manager or call apply())")
        self.reset_state()
        with ExitStack() as stack:
            for applied in self.applied.values():  # may change the call (steps) or swap in a solver
                stack.enter_context(applied.calling(kwargs))
            if self._pipeline_installed:  # the schedule on the host, for whichever scheduler runs now
                stack.enter_context(self.pipeline_graphs.host_schedule())
            run = self.pipe
            for applied in reversed(list(self.applied.values())):
                run = applied.runner(run)
            return run(*args, **kwargs)

    # -- graph modes: what the levers decide per step, and what they hand between steps ----------
    def _step_kind(self) -> tuple:
        """The coming step's kind, read from the levers' own state (see optimize.runtime.graphs)."""
        kinds = ((name, applied.step_kind()) for name, applied in (self.applied or {}).items())
        return tuple((name, kind) for name, kind in kinds if kind is not None)

    def _slots(self) -> list:
        return [slot for applied in (self.applied or {}).values() for slot in applied.slots()]

    def _generators(self) -> list:
        return [g for applied in (self.applied or {}).values() for g in applied.generators()]


def accelerate(pipe, params: Config | Mapping[str, Any], seed: int = 0, exec: str = "eager") -> Accelerated:
    """Apply a found configuration to your own pipeline.

    ``params`` is a :class:`Config` or the flat dict stored in a study / ``search_params.json``.
    Use the result as a context manager and call it instead of the pipeline::

        with optimize.accelerate(pipe, best["params"]) as fast:
            images = fast(prompts, num_inference_steps=50).images

    Leaving the block restores the pipeline exactly. With the schedule lever on, each call runs the
    configuration's solver and steps, whatever ``num_inference_steps`` says. ``exec="graphs"`` replays
    every UNet step from CUDA graphs (one per step kind, :mod:`optimize.runtime.graphs`) and the text encoders
    too, with the schedule on the host, as a study with ``--exec graphs`` timed it.
    """
    config = params if isinstance(params, Config) else Config.from_params(params)
    return Accelerated(pipe, config, seed=seed, exec=exec)
