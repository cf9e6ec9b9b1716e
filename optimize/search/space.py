"""The search space: what each trial may switch on and draw, from the levers' declared ranges, the
known-good first trials, and the sampler.

Each trial switches every allowed lever on or off and samples the parameters of those that are on,
each from the range its ``Params`` declares (one Optuna distribution per parameter name, so TPE's
grouped multivariate model sees a fixed space per study).

Example:
    >>> from optimize.levers import Context
    >>> warm_start_params(("deepcache", "tome"), Context(steps=50))[0]["deepcache.cache_interval"]
    3
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import optuna

from ..levers import LEVERS, Config, Context


@dataclass(frozen=True)
class SearchSpace:
    """The levers a study may switch on (``methods``) and the study's context: the reference steps and
    solver, the UNet's branches, SDXL. Each lever draws from the ranges its ``Params`` declare, in the
    context the levers before it leave (the schedule's steps bound T-GATE's gate step)."""

    methods: tuple[str, ...]
    context: Context

    def suggest(self, trial: optuna.Trial) -> Config:
        ctx, chosen = self.context, {}
        for lever in _SUGGESTION_ORDER:
            if lever.name not in self.methods or (lever.requires is not None and lever.requires not in chosen):
                continue
            params = lever.suggest(trial, ctx)
            if params is not None:
                chosen[lever.name] = params
                ctx = lever.context(params, ctx)
        return Config(**chosen)


# the levers in the order a trial draws them: the registry's, but a lever searched together with another
# (:attr:`optimize.levers.Lever.requires`) after all the others, once it is known whether that one is on
_SUGGESTION_ORDER = tuple(sorted(LEVERS, key=lambda lever: lever.requires is not None))


def suggestion_order() -> tuple:
    """The levers in the order a trial draws them (registry order, levers with ``requires`` last)."""
    return _SUGGESTION_ORDER


def warm_start_params(methods: tuple[str, ...], context: Context) -> list[dict[str, Any]]:
    """Known-good first trials for a fresh study: each lever's warm starts (the schedule's DPM++ at two and
    three fifths of the reference's steps, DeepCache N=3 and N=5 on branch 0, on a GPU the compiled UNet),
    each with every other lever off."""
    out = []
    for lever in LEVERS:
        if lever.name not in methods or lever.unavailable(context) is not None:
            continue
        for params in lever.warm_starts(context):
            after = lever.context(params, context)
            entry = {}
            for other in _SUGGESTION_ORDER:  # the switches a trial with this lever on asks for
                if other is lever:
                    entry.update({lever.name: True, **{lever.key(k): v for k, v in asdict(params).items()}})
                elif other.name in methods and (other.requires is None or entry.get(other.requires)):
                    seen = after if _after(other, lever) else context
                    if other.unavailable(seen) is None and other.searchable(seen):
                        entry[other.name] = False
            out.append(entry)
    return out


def _after(other, lever) -> bool:
    return _SUGGESTION_ORDER.index(other) > _SUGGESTION_ORDER.index(lever)


def make_sampler(seed: int) -> optuna.samplers.TPESampler:
    # constant_liar: trials still running in other workers count as bad guesses, so parallel workers
    # do not all propose the neighbourhood of the same good trial. No constraints_func (deprecated in
    # Optuna 5): TPE reads every trial's constraints from the attr record_constraints writes, in all modes.
    return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed, n_startup_trials=8,
                                      constant_liar=True)
