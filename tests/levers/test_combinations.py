"""Every pair of levers, and all of them at once, generated from the registry: each lever at the
midpoint of its search grid (contract.py), on the SD and SDXL layouts (and SDXL in fp16 for the levers
that need it: the VAE's upcast). Applied, the output is finite and differs; a second call equals the
first; removed, the pipeline is bit-identical and clean; under the fake graph backend the graphed
output equals the eager one. A lever that cannot run on a pipeline here (not installed, not
searchable there) is left out of "all" and skips its pairs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import generate
from contract import PIPES, PROMPT, STEPS, assert_clean, context, midpoint
from fakegraphs import FakeBackend

import optimize
from optimize.levers import LEVERS, Accelerated, Config

# a lever whose combinations trace the UNet with Dynamo takes tens of seconds each on the CPU: all the
# others at once stay in the fast subset
SLOW = {"compile"}
COMBINATIONS = [*itertools.combinations(LEVERS, 2), tuple(lever for lever in LEVERS if lever.name not in SLOW), LEVERS]


@pytest.fixture(autouse=True)
def dynamo_only(monkeypatch):
    """The compile lever with Dynamo alone (backend "eager"): it runs on the CPU and generates no code."""
    monkeypatch.setattr(__import__("optimize.levers.compile", fromlist=["BACKEND"]), "BACKEND", "eager")


def runs(lever, ctx) -> bool:
    return lever.unavailable(ctx) is None and lever.searchable(ctx) and next(iter(lever.grid(ctx)), None) is not None


def _cases():
    for levers in COMBINATIONS:
        names = {lever.name for lever in levers}
        ids = "+".join(lever.name for lever in levers)
        slow = [pytest.mark.slow] if SLOW & names else []
        # compile on the SD layout only (the SDXL layout traces the same code, for tens of seconds more),
        # but for its pair with the VAE, which only the fp16 SDXL pipeline has; every other lever all at
        # once is checked on every layout without it
        for name in ("tiny",) if SLOW & names else ("tiny", "tiny-xl"):
            yield pytest.param(name, levers, id=f"{name}-{ids}", marks=slow)
        if "vae" in names and not (SLOW & names and len(levers) > 2):  # the SDXL pipeline whose VAE is upcast
            yield pytest.param("tiny-xl-fp16", levers, id=f"tiny-xl-fp16-{ids}", marks=pytest.mark.slow)


@pytest.mark.parametrize("name,levers", list(_cases()))
def test_combination(request, name, levers):
    pipe = request.getfixturevalue(PIPES[name])
    ctx = context(pipe)
    missing = [lever.name for lever in levers if not runs(lever, ctx)]
    if missing and len(levers) == 2:
        pytest.skip(f"{', '.join(missing)} cannot run on {name} here")
    chosen = {}
    for lever in LEVERS:  # in registry order: each in the context the ones before it leave
        if lever in levers and lever.name not in missing:
            chosen[lever.name] = midpoint(lever, ctx)
            ctx = lever.context(chosen[lever.name], ctx)
    config = Config(**chosen)
    baseline = generate(pipe, PROMPT, STEPS)
    with optimize.accelerate(pipe, config, seed=1) as fast:
        first = generate(fast, PROMPT, STEPS)
        second = generate(fast, PROMPT, STEPS)
    assert np.isfinite(first).all() and not np.array_equal(first, baseline), config.label()
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(generate(pipe, PROMPT, STEPS), baseline)
    assert_clean(pipe)
    graphed = Accelerated(pipe, config, seed=1, exec="graphs", graph_backend=FakeBackend()).apply()
    try:
        np.testing.assert_array_equal(generate(graphed, PROMPT, STEPS), first)
    finally:
        graphed.remove()
    assert_clean(pipe)
