"""T-GATE (``tgate`` v2): stop cross-attention after ``gate_step`` (dropping the CFG batch half) and
reuse self-attention every ``sp_interval`` / ``fi_interval`` steps after ``warm_up``.

T-GATE runs its own sampling loop (``pipe.tgate``), so this lever replaces the call (:meth:`runner`).
Library pitfalls handled here: there is no removal API (its per-Attention ``forward`` and ``cache``
and the pipeline's ``tgate`` / ``deepcache`` attributes are removed from a snapshot); the caches
left by the end of one call, where the batch was halved, crash DeepCache and ToMe on the next call
(reset before every call); ``gate_step`` 0 reuses the previous call's cache and an interval of 0
divides by zero (refused); unknown keyword arguments are silently ignored.

Example:
    >>> from optimize.levers.tgate import TGate, LEVER
    >>> LEVER.label(TGate(gate_step=10, sp_interval=5, fi_interval=1, warm_up=2))
    'tgate(10,sp5,fi1,w2)'
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType

from ..runtime.graphs import attr_slot
from ..runtime.pipelines import default_guidance
from .base import Applied, Context, InvalidConfig, Int, Lever, Snapshot, param

# T-GATE's cache and gate need a few steps: gate_step >= 4 > warm_up keeps every sampled pair valid
MIN_STEPS = 5


@dataclass(frozen=True)
class TGate:
    """T-GATE's settings."""

    gate_step: int = param(10, valid=Int(1), search=Int(4, lambda c: None if c.steps is None else c.steps - 1),
                           doc="the step after which cross-attention is cached and the CFG half dropped")
    sp_interval: int = param(5, valid=Int(1), search=Int(1, 10),
                             doc="self-attention recomputed every N steps before the gate")
    fi_interval: int = param(1, valid=Int(1), search=Int(1, 5),
                             doc="self-attention recomputed every N steps after the gate")
    warm_up: int = param(2, valid=Int(0), search=Int(0, 3), doc="first steps computed in full")


class _Applied(Applied):
    def __init__(self, pipe, params: TGate, snapshot: Snapshot, attentions: list):
        self.pipe, self.params = pipe, params
        self._snapshot, self._attentions = snapshot, attentions

    def remove(self) -> None:
        self._snapshot.restore()

    def reset(self, seed: int) -> None:
        for module in self._attentions:
            if "cache" in module.__dict__:
                module.cache = None

    def step_kind(self):
        # T-GATE re-registers every Attention's forward per step with its flags as defaults
        flags = {getattr(m.__dict__.get("forward"), "__defaults__", None) for m in self._attentions}
        return tuple(sorted(flags, key=repr))

    def slots(self) -> list:
        # T-GATE reuses a cache only where one is there (`cache != None`): a decision taken in Python
        return [attr_slot(m, "cache", decides=True) for m in self._attentions]

    @contextmanager
    def calling(self, kwargs: dict):
        g = self.params
        steps = kwargs.get("num_inference_steps", 50)  # the schedule lever's steps, if it is on
        guidance = kwargs.get("guidance_scale", default_guidance(hasattr(self.pipe, "text_encoder_2")))
        LEVER.validate(g, Context(steps=steps, guidance=guidance))
        kwargs.update(gate_step=g.gate_step, sp_interval=g.sp_interval, fi_interval=g.fi_interval, warm_up=g.warm_up)
        yield

    def runner(self, run):
        if run is not self.pipe:  # a hook inside T-GATE's loop would be skipped without a word
            raise RuntimeError("T-GATE replaces the pipeline's call: it must be the last lever with a call hook")
        return self.pipe.tgate


class TGateLever(Lever):
    name, short, Params = "tgate", "tgate", TGate

    def searchable(self, ctx: Context) -> bool:
        return ctx.steps is not None and ctx.steps >= MIN_STEPS

    def label(self, g: TGate) -> str:
        return f"tgate({g.gate_step},sp{g.sp_interval},fi{g.fi_interval},w{g.warm_up})"

    def check(self, g: TGate, ctx: Context) -> None:
        if g.warm_up >= g.gate_step:
            raise InvalidConfig(f"tgate.warm_up ({g.warm_up}) must be smaller than tgate.gate_step ({g.gate_step})")
        if ctx.steps is not None and g.gate_step >= ctx.steps:
            raise InvalidConfig(f"tgate.gate_step ({g.gate_step}) must be smaller than the number of steps ({ctx.steps})")
        if ctx.guidance is not None and ctx.guidance <= 1:
            raise InvalidConfig("T-GATE needs classifier-free guidance (guidance scale > 1)")

    def apply(self, pipe, params: TGate, others) -> _Applied:
        attentions = [m for m in pipe.unet.modules() if type(m).__name__ == "Attention"]
        applied = _Applied(pipe, params, Snapshot([pipe, *attentions], ("tgate", "deepcache", "forward", "cache")),
                           attentions)
        xl = hasattr(pipe, "text_encoder_2")
        deepcache = others.get("deepcache")
        # DeepCache + T-GATE must share one helper and T-GATE's DeepCache-aware loop: at the gate it
        # resets DeepCache's cache when the CFG half is dropped, where a plain loop would feed the
        # cached full batch to a halved one and crash. This is what tgate's Tgate*DeepCacheLoader does,
        # with the helper the DeepCache lever already enabled instead of a second one.
        loop = "SDXL" if xl else "SD"
        if deepcache is not None:
            loop += "_DeepCache"
            pipe.deepcache = deepcache.helper
        pipe.tgate = MethodType(importlib.import_module(f"tgate.{loop}").tgate, pipe)
        return applied


LEVER = TGateLever()
