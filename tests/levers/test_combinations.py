"""Every pair of levers, and all of them at once, generated from the registry: each lever at the
midpoint of its search grid (contract.py), on the SD and SDXL layouts. Applied, the output is finite
and differs; a second call equals the first; removed, the pipeline is bit-identical and clean; under
the fake graph backend the graphed output equals the eager one."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import generate
from contract import PROMPT, STEPS, assert_clean, context, midpoint
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


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
@pytest.mark.parametrize("levers", [
    pytest.param(levers, id="+".join(lever.name for lever in levers),
                 marks=[pytest.mark.slow] if SLOW & {lever.name for lever in levers} else [])
    for levers in COMBINATIONS])
def test_combination(request, name, levers):
    pipe = request.getfixturevalue("tiny_xl_pipe" if name == "tiny-xl" else "tiny_pipe")
    ctx = context(pipe)
    chosen = {}
    for lever in LEVERS:  # in registry order: each in the context the ones before it leave
        if lever in levers:
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
