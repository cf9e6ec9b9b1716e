"""The sampling schedule: another solver and fewer steps than the study's reference (``--scheduler``,
``--steps``), searched with the other levers against that reference.

Fewer denoising steps cut the work of every other part of the call in proportion, and a multistep
solver (DPM++, UniPC) keeps more of the reference's image per step than DDIM: on the trained testbed
DDIM 25 steps against DDIM 50 costs less CLIP score than DeepCache's mildest setting
(docs/benchmarks.md).

While on, each call runs ``steps`` steps with ``solver``, whatever ``num_inference_steps`` the caller
passed: a configuration found against a 50-step reference is applied by calling it as the reference
was called. The solver is swapped in for the duration of each call only, so the pipeline's own
scheduler (same object, class and config) is back after every call, and in a graph mode the calls of
the untouched pipeline that are paired with the configuration's run the reference schedule.

Example:
    >>> from optimize.levers.schedule import Schedule, LEVER
    >>> LEVER.label(Schedule(solver="dpm++", steps=20))
    'sched(dpm++,20)'
    >>> from optimize.levers.base import Context
    >>> LEVER.warm_starts(Context(steps=50, scheduler="ddim"))
    [Schedule(solver='dpm++', steps=20), Schedule(solver='dpm++', steps=30)]
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from ..runtime.pipelines import SCHEDULERS, scheduler_for
from .base import Applied, Choice, Context, Int, Lever, param


def _fewest(ctx: Context) -> int | None:
    # a fifth of the reference: below that no solver kept the testbed's images (DPM++ 10 of 50 lost 6% CLIP)
    return None if ctx.steps is None else max(2, ctx.steps // 5)


def _below_reference(ctx: Context) -> int | None:
    return None if ctx.steps is None else ctx.steps - 1


@dataclass(frozen=True)
class Schedule:
    """The sampling schedule's settings."""

    solver: str = param("dpm++", valid=Choice(tuple(SCHEDULERS)),
                        doc="the scheduler (a --scheduler name), built on the pipeline's own scheduler config")
    steps: int = param(25, valid=Int(1), search=Int(_fewest, _below_reference),
                       doc="denoising steps of each call, instead of the reference's")


class _Applied(Applied):
    def __init__(self, pipe, params: Schedule):
        self.pipe, self.params = pipe, params
        self.solver = scheduler_for(pipe.scheduler, params.solver)

    def remove(self) -> None:
        pass  # the pipeline's scheduler is swapped during a call only (calling)

    @contextmanager
    def calling(self, kwargs: dict):
        kwargs["num_inference_steps"] = self.params.steps
        own = self.pipe.__dict__["scheduler"]
        # straight into __dict__: DiffusionPipeline.__setattr__ would also rewrite the pipeline's config
        self.pipe.__dict__["scheduler"] = self.solver
        try:
            yield
        finally:
            self.pipe.__dict__["scheduler"] = own


class ScheduleLever(Lever):
    name, short, Params = "schedule", "sched", Schedule

    def searchable(self, ctx: Context) -> bool:
        return ctx.steps is not None and _fewest(ctx) <= _below_reference(ctx)

    def label(self, params: Schedule) -> str:
        return f"sched({params.solver},{params.steps})"

    def context(self, params: Schedule, ctx: Context) -> Context:
        from .base import with_context

        return with_context(ctx, steps=params.steps, scheduler=params.solver)

    def warm_starts(self, ctx: Context) -> list[Schedule]:
        # DPM++ (2M) at two fifths of the reference's steps: DPM-Solver++ needs 15-20 steps where DDIM needs
        # 50, and 20 steps is its usual setting. On the testbed, DPM++ 20 against DDIM 50 cost -0.006 CLIP on
        # 128 held-out captions, where the reference's own solver at half its steps (DDIM 25) cost +0.018.
        # Then at three fifths, for a short reference: against DDIM 20, DPM++ 8 cost +0.040 on 64 held-out
        # captions and DPM++ 12 +0.001. The bolder one first: once it is feasible the speed gate skips
        # scoring the milder one.
        if not self.searchable(ctx):
            return []
        # searchable means at least 3 reference steps, where three fifths rounds below the reference;
        # where both fractions round to the same steps, one trial
        steps = dict.fromkeys(max(_fewest(ctx), round(ctx.steps * f)) for f in (2 / 5, 3 / 5))
        return [Schedule(solver="dpm++", steps=n) for n in steps]

    def apply(self, pipe, params: Schedule, others) -> _Applied:
        return _Applied(pipe, params)


LEVER = ScheduleLever()
