"""A configuration: which levers are on, with their parameters, as Optuna stores them and back.

Example:
    >>> cfg = Config.from_params({"deepcache": True, "deepcache.cache_interval": 3, "tome": False})
    >>> cfg.label(), cfg.methods
    ('dc(3,b0)', ('deepcache',))
    >>> cfg.to_params()["deepcache.cache_interval"]
    3
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from .base import Context, InvalidConfig, Lever
from .registry import BY_NAME, LEVERS


class Config:
    """Which levers are on (``Config(deepcache=DeepCache(3, 0))``); a lever not named is off.
    Immutable and hashable; ``config.deepcache`` is that lever's params or ``None``."""

    __slots__ = ("_on",)

    def __init__(self, **levers: Any):
        unknown = sorted(set(levers) - set(BY_NAME))
        if unknown:
            raise InvalidConfig(f"unknown lever(s): {', '.join(unknown)} (known: {', '.join(BY_NAME)})")
        on = {}
        for lever in LEVERS:
            params = levers.get(lever.name)
            if params is None:
                continue
            if not isinstance(params, lever.Params):
                raise InvalidConfig(f"{lever.name} must be {lever.Params.__name__}(...) or None, got {params!r}")
            on[lever.name] = params
        object.__setattr__(self, "_on", on)

    def __setattr__(self, name, value):
        raise AttributeError("Config is immutable")

    def __getattr__(self, name: str):
        if name in BY_NAME:
            return self._on.get(name)
        raise AttributeError(name)

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self._on == other._on

    def __hash__(self) -> int:
        return hash(tuple(self._on.items()))

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{k}={v!r}' for k, v in self._on.items())})"

    def items(self) -> Iterator[tuple[Lever, Any]]:
        """The levers that are on, with their params, in registry order."""
        return ((BY_NAME[name], params) for name, params in self._on.items())

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self._on)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "Config":
        """Build from flat params as Optuna stores them: ``{"deepcache": True, "deepcache.cache_interval": 3}``.

        A lever whose switch is missing is on if any of its parameters is given; a lever not named at all
        is off (so params stored before a lever existed still read).
        """
        if not isinstance(params, Mapping):
            raise InvalidConfig(f"params must be a mapping of parameter names to values, got {type(params).__name__}")
        known = {*BY_NAME, *(k for lever in LEVERS for k in lever.keys())}
        unknown = sorted(set(params) - known, key=str)
        if unknown:
            raise InvalidConfig(f"unknown parameter(s): {', '.join(map(str, unknown))} (known: {', '.join(sorted(known))})")
        kwargs = {}
        for lever in LEVERS:
            sub = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(lever.name + ".")}
            on = params.get(lever.name, bool(sub))
            if not isinstance(on, bool):
                raise InvalidConfig(f"{lever.name} must be true or false, got {on!r}")
            if on:
                kwargs[lever.name] = lever.Params(**sub)
        return cls(**kwargs)

    def to_params(self) -> dict[str, Any]:
        """Flat params: every lever's switch, the fields of those that are on."""
        from dataclasses import asdict

        out: dict[str, Any] = {}
        for lever in LEVERS:
            params = self._on.get(lever.name)
            out[lever.name] = params is not None
            if params is not None:
                out.update({lever.key(k): v for k, v in asdict(params).items()})
        return out

    def label(self) -> str:
        """Short human label, e.g. ``sched(dpm++,20)+dc(3,b0)+tgate(10,sp5,fi1,w2)``."""
        return "+".join(lever.label(params) for lever, params in self.items()) or "baseline"

    def validate(self, pipe=None, num_inference_steps: int | None = None, guidance_scale: float | None = None) -> None:
        """Raise :class:`InvalidConfig` for values the libraries crash on or silently ignore; with a
        pipeline, steps and guidance, also for what only they decide (the UNet's branches, SDXL)."""
        self.context(Context.of(pipe, num_inference_steps, guidance_scale), validate=True)

    def context(self, ctx: Context, validate: bool = False) -> Context:
        """The context a call runs in once the levers that are on have changed it: a call made with
        ``Context(steps=50, scheduler="ddim")`` runs the schedule lever's solver and steps."""
        for lever, params in self.items():
            if validate:
                lever.validate(params, ctx)
            ctx = lever.context(params, ctx)
        return ctx
