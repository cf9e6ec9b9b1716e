"""The lever protocol: what one training-free acceleration declares and does.

A *lever* is one module of this package holding:

* a frozen ``Params`` dataclass whose fields declare, once, the range each value may take
  (``valid``, checked by :meth:`Lever.validate`) and the range the search draws from (``search``);
  search spaces, validation, test grids and benchmark grids all read these declarations;
* a :class:`Lever` subclass: its stored name (``deepcache`` switches it, ``deepcache.cache_interval``
  holds a field), a short label, and :meth:`Lever.apply`;
* an :class:`Applied` subclass: what ``apply`` returns, with an exact, idempotent :meth:`Applied.remove`,
  the per-call :meth:`Applied.reset`, its part of the step kind (:mod:`optimize.runtime.graphs`), what
  computes a step (:meth:`Applied.step`), and the call hooks of a lever that changes the call itself.

The registry (:data:`optimize.levers.LEVERS`) is the only list of levers; nothing outside a lever's
module branches on that lever.

Example:
    >>> from optimize.levers import LEVERS
    >>> [lever.name for lever in LEVERS]
    ['schedule', 'deepcache', 'tome', 'tgate', 'layout', 'precision', 'vae', 'compile']
    >>> deepcache = LEVERS[1]
    >>> deepcache.label(deepcache.Params(cache_interval=3))
    'dc(3,b0)'
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

_MISSING = object()
# what :meth:`Lever.no_gain` says of a lever that speeds up a CUDA GPU's UNet step (launches, fused
# kernels, tensor cores), on another device
GPU_ONLY = "it speeds up a CUDA GPU's UNet step; here it would only cost trials"


class InvalidConfig(ValueError):
    """A configuration the libraries would crash on or silently ignore; the message names the parameter."""


@dataclass(frozen=True)
class Device:
    """The device a pipeline runs on, as far as levers care: known before any model loads.

    Example:
        >>> Device.of("cpu")
        Device(type='cpu', capability=None)
    """

    type: str  # "cuda", "cpu", ...
    capability: tuple[int, int] | None = None  # CUDA compute capability: (9, 0) on Hopper, where fp8 runs

    @classmethod
    def of(cls, device) -> "Device":
        """From a ``torch.device`` or a name (``"cuda:1"``); asks the driver, loads no model."""
        name = str(device)
        kind = name.split(":")[0]
        if kind != "cuda":
            return cls(kind)
        import torch

        index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
        return cls("cuda", tuple(torch.cuda.get_device_capability(index)))


@dataclass(frozen=True)
class Context:
    """What a lever's ranges and checks depend on. ``None``: not known here (checked at the call).

    Levers are applied in registry order and each may change what the later ones see
    (:meth:`Lever.context`): the schedule lever's steps are the steps DeepCache and T-GATE run.
    """

    steps: int | None = None  # denoising steps of a call
    guidance: float | None = None
    xl: bool | None = None
    max_branch_id: int | None = None  # DeepCache's deepest skip branch for this UNet
    scheduler: str | None = None  # the study's --scheduler name, the reference solver
    device: Device | None = None  # where the pipeline runs (what levers that need a GPU feature ask)
    dtype: str | None = None  # the UNet's dtype, "float16": which attention kernels run on it
    vae_upcast: bool | None = None  # an SDXL pipeline decoding with its fp16 VAE upcast to fp32 (force_upcast)

    @classmethod
    def of(cls, pipe=None, steps: int | None = None, guidance: float | None = None,
           scheduler: str | None = None) -> "Context":
        if pipe is None:
            return cls(steps, guidance, scheduler=scheduler)
        xl = hasattr(pipe, "text_encoder_2")
        vae = getattr(pipe, "vae", None)
        # SDXL's pipelines (not SD's) decode an fp16 VAE in fp32 when its config says force_upcast
        upcast = xl and vae is not None and str(vae.dtype) == "torch.float16" and bool(vae.config.get("force_upcast"))
        # DeepCache counts 3 layers per down block
        return cls(steps, guidance, xl, 3 * len(pipe.unet.down_blocks) - 1, scheduler, Device.of(pipe.device),
                   str(pipe.unet.dtype).removeprefix("torch."), upcast)


# --- ranges: declared once on each Params field ----------------------------------------------------
Bound = Any  # a number, None (unbounded), or a function of the Context (None where unknown)


def _resolve(bound: Bound, ctx: Context):
    return bound(ctx) if callable(bound) else bound


@dataclass(frozen=True)
class Int:
    """Integers in ``[low, high]``; a bound may be a function of the :class:`Context`."""

    low: Bound = None
    high: Bound = None

    def check(self, name: str, value, ctx: Context) -> None:
        low, high = _resolve(self.low, ctx), _resolve(self.high, ctx)
        if (isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low)
                or (high is not None and value > high)):
            raise InvalidConfig(f"{name} must be an integer {_interval(low, high)}, got {value!r}")

    def bounds(self, ctx: Context) -> tuple[int, int]:
        return _resolve(self.low, ctx), _resolve(self.high, ctx)

    def suggest(self, trial, name: str, ctx: Context) -> int:
        return trial.suggest_int(name, *self.bounds(ctx))

    def grid(self, ctx: Context) -> list[int]:
        low, high = self.bounds(ctx)
        return list(range(low, high + 1))

    def distribution(self, ctx: Context):
        from optuna.distributions import IntDistribution

        return IntDistribution(*self.bounds(ctx))


@dataclass(frozen=True)
class Float:
    """Numbers in ``[low, high]`` (``open``: both ends excluded), drawn on a ``step`` grid."""

    low: Bound = None
    high: Bound = None
    step: float | None = None
    open: bool = False

    def check(self, name: str, value, ctx: Context) -> None:
        low, high = _resolve(self.low, ctx), _resolve(self.high, ctx)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidConfig(f"{name} must be a number, got {value!r}")
        below = low is not None and (value <= low if self.open else value < low)
        above = high is not None and (value >= high if self.open else value > high)
        if below or above:
            where = f"in ({low:g}, {high:g})" if self.open else _interval(low, high)
            raise InvalidConfig(f"{name} must be {where}, got {value!r}")

    def suggest(self, trial, name: str, ctx: Context) -> float:
        value = trial.suggest_float(name, _resolve(self.low, ctx), _resolve(self.high, ctx), step=self.step)
        return round(value, 6)  # 0.35000000000000003 from the step grid is stored as 0.35

    def grid(self, ctx: Context) -> list[float]:
        low, high = _resolve(self.low, ctx), _resolve(self.high, ctx)
        n = int(round((high - low) / self.step))
        return [round(low + i * self.step, 6) for i in range(n + 1)]

    def distribution(self, ctx: Context):
        from optuna.distributions import FloatDistribution

        return FloatDistribution(_resolve(self.low, ctx), _resolve(self.high, ctx), step=self.step)


@dataclass(frozen=True)
class Choice:
    """One of ``options`` (a tuple, or a function of the :class:`Context`)."""

    options: Any

    def check(self, name: str, value, ctx: Context) -> None:
        options = _resolve(self.options, ctx)
        if value not in options or isinstance(value, bool) != any(isinstance(o, bool) for o in options):
            raise InvalidConfig(f"{name} must be one of {', '.join(map(str, options))}, got {value!r}")

    def suggest(self, trial, name: str, ctx: Context):
        return trial.suggest_categorical(name, list(_resolve(self.options, ctx)))

    def grid(self, ctx: Context) -> list:
        return list(_resolve(self.options, ctx))

    def distribution(self, ctx: Context):
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(list(_resolve(self.options, ctx)))


def _interval(low, high) -> str:
    if high is None:
        return f">= {low}"
    if low is None:
        return f"<= {high}"
    return f"in {low}..{high}"


def param(default, *, valid, search=None, doc: str):
    """A ``Params`` field: its default, the values it may take, the values the search draws from
    (``valid`` when not given) and what it means. The one place a range is written."""
    return field(default=default, metadata={"valid": valid, "search": search if search is not None else valid,
                                            "doc": doc})


def spec(params_class, name: str) -> Mapping[str, Any]:
    """The declaration of one field: ``valid``, ``search``, ``doc``."""
    return next(f.metadata for f in fields(params_class) if f.name == name)


# --- the protocol ----------------------------------------------------------------------------------
class Applied:
    """A lever applied to one pipeline. Every hook but :meth:`remove` has a do-nothing default."""

    def remove(self) -> None:
        """Undo everything ``apply`` did: modules, attributes, schedulers. Exact and idempotent."""
        raise NotImplementedError

    def reset(self, seed: int) -> None:
        """Before every call: forget what the previous call left behind."""

    def step_kind(self):
        """This lever's part of the coming UNet step's kind; ``None``: it takes no part. Asked once
        before every UNet step in every mode, after the UNet's call wrappers ran and before its forward
        (:class:`optimize.runtime.graphs.Step`): a lever whose Python inside the forward branches per
        step settles the branch here and freezes it where that Python reads it (DeepCache), so a graph
        mode captures one graph per kind and a compiled UNet traces one graph per kind."""
        return None

    def step(self, forward: Callable) -> Callable:
        """What computes a UNet step: ``forward`` (the UNet's own, with the levers' Python inside it) or
        a replacement computing the same (a compiled one). It runs beneath every wrapper of the UNet's
        call, after the step's kind was decided; a graph mode captures it."""
        return forward

    def slots(self) -> list:
        """State handed from one UNet step to the next (:class:`optimize.runtime.graphs.Slot`)."""
        return []

    def generators(self) -> list:
        """Random generators a UNet step draws from."""
        return []

    def calling(self, kwargs: dict):
        """A context manager around each call: it may change the call's keyword arguments in place
        and swap parts of the pipeline for the call's duration (the schedule's solver)."""
        return nullcontext()

    def runner(self, run: Callable) -> Callable:
        """What runs the call: ``run`` (the pipeline) or a replacement (T-GATE's own sampling loop)."""
        return run


class Lever:
    """One training-free acceleration. Subclasses set ``name``, ``short``, ``Params`` and ``apply``;
    the rest is derived from the ``Params`` declarations."""

    name: ClassVar[str]
    short: ClassVar[str]
    Params: ClassVar[type]
    # the lever this one is searched together with: it is drawn only in trials where that one is on
    # (after every other lever), and a run searches it only where it searches that one too
    requires: ClassVar[str | None] = None

    def __repr__(self) -> str:
        return f"<lever {self.name}>"

    def key(self, field_name: str) -> str:
        """The stored parameter name of a field: ``deepcache.cache_interval``."""
        return f"{self.name}.{field_name}"

    def keys(self) -> list[str]:
        return [self.key(f.name) for f in fields(self.Params)]

    # -- search --------------------------------------------------------------------------------
    def unavailable(self, ctx: Context) -> str | None:
        """Why this lever cannot run in ``ctx`` (one line, said once before anything loads), or
        ``None``. A lever that needs a GPU feature answers from ``ctx.device``; ``None`` there means
        not known yet. An unavailable lever is never searched, and validating it on is an error."""
        return None

    def no_gain(self, ctx: Context) -> str | None:
        """Why searching this lever in ``ctx`` would spend trials for nothing although it runs (a lever
        that speeds up a GPU's step, on a CPU), or ``None``. A run leaves it out of its default levers
        with one line; named in ``--methods``, it is searched."""
        return None

    def searchable(self, ctx: Context) -> bool:
        """Whether the search may switch this lever on in this context."""
        return True

    def suggest(self, trial, ctx: Context):
        """The switch, then each field from its ``search`` range; ``None`` when off."""
        if (self.unavailable(ctx) is not None or not self.searchable(ctx)
                or not trial.suggest_categorical(self.name, [False, True])):
            return None
        return self.Params(**{f.name: f.metadata["search"].suggest(trial, self.key(f.name), ctx)
                              for f in fields(self.Params)})

    def distributions(self, ctx: Context) -> dict:
        """The Optuna distribution of the switch and of each field, as :meth:`suggest` draws them."""
        from optuna.distributions import CategoricalDistribution

        return {self.name: CategoricalDistribution([False, True]),
                **{self.key(f.name): f.metadata["search"].distribution(ctx) for f in fields(self.Params)}}

    def warm_starts(self, ctx: Context) -> list:
        """Known-good settings to try first in a fresh study (each alone)."""
        return []

    def grid(self, ctx: Context) -> Iterable:
        """Every setting the search can draw in ``ctx`` (for tests and benchmarks; may be large)."""
        import itertools

        names = [f.name for f in fields(self.Params)]
        values = [f.metadata["search"].grid(ctx) for f in fields(self.Params)]
        for combo in itertools.product(*values):
            params = self.Params(**dict(zip(names, combo)))
            try:
                self.check(params, ctx)
            except InvalidConfig:
                continue
            yield params

    # -- checking ------------------------------------------------------------------------------
    def validate(self, params, ctx: Context) -> None:
        """Raise :class:`InvalidConfig`, naming the parameter, for a value the library would crash on or
        silently ignore."""
        reason = self.unavailable(ctx)
        if reason is not None:
            raise InvalidConfig(f"{self.name}: {reason}")
        for f in fields(params):
            f.metadata["valid"].check(self.key(f.name), getattr(params, f.name), ctx)
        self.check(params, ctx)

    def check(self, params, ctx: Context) -> None:
        """Checks across fields, or against the context, that one field's range cannot say."""

    def context(self, params, ctx: Context) -> Context:
        """The context the levers after this one see while it is on."""
        return ctx

    def label(self, params) -> str:
        raise NotImplementedError

    def apply(self, pipe, params, others: Mapping[str, Applied]) -> Applied:
        """Apply to ``pipe``; ``others``: the levers applied before this one, by name."""
        raise NotImplementedError


class Snapshot:
    """Instance attributes of some objects as they were, to put back exactly: values restored, and
    attributes that were absent removed again (the libraries add instance-level ``forward``\\ s,
    caches and markers that break later calls or removal if left behind)."""

    def __init__(self, objects: Iterable, names: Sequence[str]):
        self._saved = [(obj, {n: obj.__dict__.get(n, _MISSING) for n in names}) for obj in objects]

    def restore(self) -> None:
        for obj, attrs in self._saved:
            for name, value in attrs.items():
                if value is _MISSING:
                    obj.__dict__.pop(name, None)
                else:
                    obj.__dict__[name] = value


class Undo:
    """What an ``apply`` did, as the steps that take it back: :meth:`run` takes them last-first, each
    once, so a half-done apply and a second removal undo exactly what was done."""

    def __init__(self):
        self._steps: list[Callable[[], None]] = []

    def add(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def run(self) -> None:
        failed = None
        while self._steps:
            try:
                self._steps.pop()()
            except Exception as e:  # noqa: BLE001 - the other steps still run; the first failure is raised
                failed = failed or e
        if failed is not None:
            raise failed


def with_context(ctx: Context, **changes) -> Context:
    return replace(ctx, **changes)
