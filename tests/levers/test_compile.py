"""The compile lever: the lever contract on the CPU with Dynamo alone (backend "eager": graphs are traced
and counted, no code is generated), one Dynamo graph per step kind under DeepCache, the graphs reused
by a later configuration, a per-step decision inside the forward refused, and where it may run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import generate
from contract import PROMPT, STEPS, LeverContract, assert_clean

import optimize
from optimize.levers import BY_NAME, Accelerated, Config, Context, InvalidConfig
from optimize.levers.base import Device
from optimize.runtime.compiling import graphs_of

LEVER = BY_NAME["compile"]
compile_module = __import__("optimize.levers.compile", fromlist=["BACKEND"])


@pytest.fixture(autouse=True)
def dynamo_only(monkeypatch):
    monkeypatch.setattr(compile_module, "BACKEND", "eager")


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.mark.slow
class TestCompileContract(LeverContract):
    lever = LEVER

    def test_apply_changes_the_output_and_remove_restores_it_bit_for_bit(self, pipe):
        """Replaced: Dynamo alone computes what eager computes, so here the output is equal, not
        different; what it must show is that every step ran the compiled forward, and that nothing of
        it stays after removal."""
        baseline = generate(pipe, PROMPT, STEPS)
        acc = optimize.accelerate(pipe, self.config(pipe))
        with acc:
            step, calls = acc.step.compute, []
            compiled = step.compiled
            step.compiled = lambda *a, **k: calls.append(1) or compiled(*a, **k)
            out = generate(acc, PROMPT, STEPS)
        assert len(calls) == STEPS and graphs_of(type(pipe.unet).forward) >= 1
        np.testing.assert_array_equal(out, baseline)
        np.testing.assert_array_equal(generate(pipe, PROMPT, STEPS), baseline)
        assert_clean(pipe)
        acc.remove()
        np.testing.assert_array_equal(generate(pipe, PROMPT, STEPS), baseline)


DC3 = {"deepcache": True, "deepcache.cache_interval": 3, "deepcache.cache_branch_id": 0}


@pytest.mark.slow
def test_deepcache_under_a_whole_unet_compile_traces_one_graph_per_kind_not_per_step(tiny_pipe):
    """DeepCache N=3 over 10 steps: 3 graphs (full with an empty cache, full, partial), not 10; none
    more on a second call or for another interval; the images those of eager DeepCache, bit for bit."""
    torch._dynamo.reset()
    with optimize.accelerate(tiny_pipe, DC3) as eager:
        want = generate(eager, PROMPT, 10)
    start = dynamo_graphs()
    with optimize.accelerate(tiny_pipe, {**DC3, "compile": True}) as fast:
        first = generate(fast, PROMPT, 10)
        assert dynamo_graphs() - start == 3
        second = generate(fast, PROMPT, 10)
    assert dynamo_graphs() - start == 3
    np.testing.assert_array_equal(first, want)
    np.testing.assert_array_equal(second, want)
    with optimize.accelerate(tiny_pipe, {**DC3, "deepcache.cache_interval": 5, "compile": True}) as other:
        generate(other, PROMPT, 10)  # another configuration, the same kinds: the graphs are found again
    assert dynamo_graphs() - start == 3
    assert_clean(tiny_pipe)


@pytest.mark.slow
def test_a_decision_per_step_inside_the_forward_fails_the_trial_instead_of_running_eagerly(tiny_pipe):
    """DeepCache's block wrappers as the library has them read the step counter: Dynamo would trace a
    graph per step. A third call of one kind that compiles stops that with the reason."""
    acc = Accelerated(tiny_pipe, Config.from_params({**DC3, "compile": True})).apply()
    try:
        del acc.applied["deepcache"].helper.__dict__["is_skip_step"]  # back to the counter
        with pytest.raises(RuntimeError, match="decides per step"):
            generate(acc, PROMPT, 10)
    finally:
        acc.remove()
    assert_clean(tiny_pipe)


def test_where_it_may_run(monkeypatch):
    assert LEVER.unavailable(Context()) is None  # not known yet: checked when applied
    monkeypatch.setattr(compile_module, "BACKEND", "inductor")
    assert "CUDA" in LEVER.unavailable(Context(device=Device("cpu")))
    assert "7.0" in LEVER.unavailable(Context(device=Device("cuda", (6, 1))))
    with pytest.raises(InvalidConfig, match="compile: needs a CUDA device"):
        LEVER.validate(LEVER.Params(), Context(device=Device("cpu")))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert "Triton" in LEVER.unavailable(Context(device=Device("cuda", (9, 0))))
    monkeypatch.undo()
    monkeypatch.setattr(compile_module, "BACKEND", "eager")  # the tests' compiler runs anywhere
    assert LEVER.unavailable(Context(device=Device("cpu"))) is None


def test_modes_that_capture_cuda_graphs_of_their_own_are_refused():
    ctx = Context(steps=20)
    LEVER.validate(LEVER.Params(mode="max-autotune-no-cudagraphs"), ctx)
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(InvalidConfig, match=r"compile\.mode"):
            LEVER.validate(LEVER.Params(mode=mode), ctx)
    assert [p.mode for p in LEVER.grid(ctx)] == ["default"]  # max-autotune: valid, not searched


def test_the_gpu_benchmark_imports_and_refuses_graphs_on_a_cpu(tmp_path):
    """benchmarks/gpu_compile.py: graphs need CUDA; here it must import and say so, loading nothing."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "gpu_compile.py")
    out = subprocess.run([sys.executable, script, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1].startswith("--exec graphs needs CUDA")
    assert not os.listdir(tmp_path)
