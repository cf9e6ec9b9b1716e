"""``torch.compile`` of the whole UNet (inductor): kernels fused across the UNet's blocks.

One SD1.5 UNet step on an H200 (CFG batch 2, fp16) took 11.9 ms replayed from a CUDA graph and 7.1 ms
compiled and replayed (docs/benchmarks.md; 12.3 and 6.4 ms on an H100); compiling each block on its own
(``--exec compile``) gained nothing clear on the H100, as fusion stops at every block's boundary. So
this lever compiles the whole forward.

**Where it sits.** :class:`~optimize.levers.Accelerated` puts the UNet's own forward behind a
:class:`~optimize.runtime.graphs.Step` before anything wraps the UNet; this lever replaces what
computes the step there (:meth:`_Applied.step`). The compiled region is the UNet's forward with the
other levers' Python inside it (DeepCache's block wrappers, T-GATE's attention forwards, ToMe's
blocks); what decides per step runs outside it: DeepCache's step counter and every lever's step kind
(decided in ``step_kind`` before the forward), T-GATE's sampling loop. Dynamo so traces **one graph
per step kind**, not one per step (DeepCache N=3: 3 graphs over any number of steps, the same on the
next call and for every interval). In a graph mode the compiled step is what
:class:`~optimize.runtime.graphs.StepGraphs` captures, one CUDA graph per kind; both modes here leave
CUDA graphs to it (inductor's own would capture inside a capture). Eagerly the compiled step runs as it is.

**Recompiles.** While applied, at most :data:`CALLS_THAT_COMPILE_PER_KIND` calls of each step kind
and input shape may compile anything (a kind's first call may find a cache empty that its later calls
find filled: DeepCache's full step); one more is a lever deciding per step inside the forward, and the
trial fails saying so. Dynamo's own per-function limits are raised for the call instead: they count
over the whole process, every configuration and every UNet block function that a graph break leaves
to compile on its own (one graph per shape: ToMe's breaks leave each ResNet block's forward a graph
for each of its shapes), and past them Dynamo runs the UNet eagerly, which the trial would time.

**Compile cost, paid once.** A cold whole-UNet compile took 61 s on the H200, per graph. The
search does not spend its time recompiling: (1) the lever's own fields are not searched (only
on/off), and the other levers' settings that only change *which* kinds run (DeepCache's interval,
T-GATE's gate step and intervals, the schedule's solver and steps) trace no new graph, so the
compiled variants of a study are few: one per DeepCache branch, T-GATE on or off and ToMe setting
(ToMe's ratio changes the token counts; its random draws are graph breaks); (2) in a run, every
configuration calls the same compiled function (:func:`optimize.runtime.compiling.compiled`), whose
graphs Dynamo keeps with their guards: a later trial meeting a graph already traced reuses it, in
the eager mode's apply and remove around every paired round too; (3) across runs, inductor's and
AOTAutograd's on-disk caches live in the directory the run sets beside the study
(``TORCHINDUCTOR_CACHE_DIR``), so a resumed run or another worker on the machine takes a known graph
from disk (7.3 s instead of 61 s in a fresh process on the H200). Every trial stores the seconds it
spent compiling (``compile_s``) beside its wall time (``wall_s``), so where compiling dominated shows
in the study.

**Where it runs.** On CUDA devices of compute capability 7.0 or newer with Triton. Not on the CPU:
inductor builds C++ there, minutes per graph for a UNet, more than the offline demo's whole search.

Example:
    >>> from optimize.levers.compile import Compile, LEVER
    >>> LEVER.label(Compile()), LEVER.label(Compile(mode="max-autotune-no-cudagraphs"))
    ('compile', 'compile(max-autotune-no-cudagraphs)')
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from ..runtime.compiling import compiled, frames_compiled, signature
from .base import Applied, Choice, Context, Lever, param

# inductor's modes that leave CUDA graphs to StepGraphs ("reduce-overhead" and "max-autotune" capture their own)
MODES = ("default", "max-autotune-no-cudagraphs")
# the compiler; tests on the CPU set "eager" (Dynamo alone: the graphs are counted, nothing is generated)
BACKEND = "inductor"
# a kind's first call may find a cache empty that its later calls find filled (DeepCache's full step):
# two calls of one kind may compile, a third is a decision per step
CALLS_THAT_COMPILE_PER_KIND = 2
DYNAMO_LIMIT = 1024


@dataclass(frozen=True)
class Compile:
    """The compile lever's settings."""

    # max-autotune benchmarks kernel choices for every graph: minutes more per graph, so valid, not searched
    mode: str = param("default", valid=Choice(MODES), search=Choice(MODES[:1]),
                      doc="inductor's mode: default, or max-autotune-no-cudagraphs (benchmarks kernel choices "
                          "while compiling)")


class _CompiledStep:
    """The UNet's forward, compiled; a step kind that keeps compiling fails the call (module docstring)."""

    def __init__(self, forward: Callable, mode: str, kinds: Callable[[], tuple]):
        self.function = getattr(forward, "__func__", forward)  # compiled unbound: the cache keeps no UNet alive
        self.owner = (forward.__self__,) if hasattr(forward, "__self__") else ()
        self.compiled = compiled(self.function, BACKEND, None if mode == "default" else mode)
        self.kinds = kinds
        self.compiling: Counter = Counter()  # per (step kind, input signature): the calls that compiled

    def __call__(self, *args, **kwargs):
        import torch._dynamo
        from torch._dynamo.exc import FailOnRecompileLimitHit

        kind, before = self.kinds(), frames_compiled()
        try:
            # Dynamo's own limits count graphs per function over the whole process (every configuration,
            # every UNet block function a graph break leaves to compile on its own, one graph per shape);
            # past them it would run the UNet eagerly and the trial time that, so they are raised here and
            # the per-kind count below is the check
            with torch._dynamo.config.patch(recompile_limit=DYNAMO_LIMIT, accumulated_recompile_limit=DYNAMO_LIMIT,
                                            fail_on_recompile_limit_hit=True):
                out = self.compiled(*self.owner, *args, **kwargs)
        except FailOnRecompileLimitHit:
            raise RuntimeError(f"compile: Dynamo kept {DYNAMO_LIMIT} graphs of one function in this process "
                               "and would run the rest eagerly") from None
        if frames_compiled() > before:  # the call's signature read only then: every step passes here
            met = (kind, signature(args, kwargs))
            self.compiling[met] += 1
            if self.compiling[met] > CALLS_THAT_COMPILE_PER_KIND:
                raise RuntimeError(f"compile: {self.compiling[met]} calls of one step kind compiled the UNet anew: "
                                   "something inside its forward decides per step (decide it in the lever's "
                                   "step_kind instead)")
        return out


class _Applied(Applied):
    def __init__(self, params: Compile, others: dict):
        self.params = params
        self._others = list(others.values())  # whose step kinds select the graph

    def remove(self) -> None:
        # nothing on the UNet: Accelerated drops the compiled step with its Step; the graphs stay with
        # the compiled function for the next configuration (module docstring)
        pass

    def step(self, forward: Callable) -> Callable:
        return _CompiledStep(forward, self.params.mode,
                             lambda: tuple(applied.step_kind() for applied in self._others))


class CompileLever(Lever):
    name, short, Params = "compile", "compile", Compile

    def unavailable(self, ctx: Context) -> str | None:
        device = ctx.device
        if device is None or BACKEND != "inductor":
            return None
        if device.type != "cuda":
            return ("needs a CUDA device: on the CPU inductor builds C++ for the UNet, minutes per step kind, "
                    "more than a trial gains")
        if device.capability is not None and device.capability < (7, 0):
            major, minor = device.capability
            return f"needs compute capability 7.0 or newer for Triton (this GPU has {major}.{minor})"
        if importlib.util.find_spec("triton") is None:
            return "needs Triton (pip install triton), which inductor generates its GPU kernels with"
        return None

    def warm_starts(self, ctx: Context) -> list[Compile]:
        # the whole UNet compiled: 1.66x a graph-replayed SD1.5 step on an H200 (11.9 -> 7.1 ms), one graph to compile
        return [Compile()]

    def label(self, params: Compile) -> str:
        return "compile" if params.mode == "default" else f"compile({params.mode})"

    def apply(self, pipe, params: Compile, others) -> _Applied:
        return _Applied(params, others)


LEVER = CompileLever()
