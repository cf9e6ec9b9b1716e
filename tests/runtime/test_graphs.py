"""optimize.runtime.graphs on CPU: which graph each UNet call replays, the state handed between step kinds,
re-capture on new shapes, one application per measurement, and graphed output == eager output, on the
fake backend of tests/fakegraphs.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import generate
from fakegraphs import FakeBackend

from optimize import Config, DeepCache, InvalidConfig, TGate, ToMe
from optimize.levers import Accelerated
from optimize.runtime.graphs import GraphUnsupported, PipelineGraphs, StepGraphs, check_exec
from optimize.measure.evaluator import Evaluator, GenerationSettings

STEPS = 8
PROMPT = ["a red fox in the snow"]
TGATE = TGate(gate_step=4, sp_interval=2, fi_interval=1, warm_up=1)


def _graphed(pipe, config, backend, record=True):
    acc = Accelerated(pipe, config, exec="graphs", graph_backend=backend)
    acc.apply()
    acc.graphs.record_kinds = record
    return acc


# --- graphed == eager, every combination ---------------------------------------------------------
@pytest.mark.parametrize("deepcache,tome,tgate", [
    pytest.param(*on, id="+".join(m for m, o in zip(("dc", "tome", "tgate"), on) if o) or "none")
    for on in itertools.product([False, True], repeat=3)
])
def test_graphed_output_equals_eager(tiny_pipe, deepcache, tome, tgate):
    config = Config(deepcache=DeepCache(3, 0) if deepcache else None, tome=ToMe(0.5, 1) if tome else None,
                    tgate=TGATE if tgate else None)
    baseline = generate(tiny_pipe, PROMPT, STEPS)
    with Accelerated(tiny_pipe, config) as eager:
        want = generate(eager, PROMPT, STEPS)
    backend = FakeBackend()
    acc = _graphed(tiny_pipe, config, backend)
    unet, rest = acc.graphs, acc.pipeline_graphs
    try:
        first = generate(acc, PROMPT, STEPS)
        captures = backend.captures
        second = generate(acc, PROMPT, STEPS)
        parts = {type(p.module).__name__: (p.stats.captures, p.stats.replays) for p in rest.parts}
    finally:
        acc.remove()
    np.testing.assert_array_equal(first, want)
    np.testing.assert_array_equal(second, want)  # replayed calls, state reset between them
    assert backend.captures == captures, "the second call captured again"
    assert unet.stats.replays == 2 * STEPS
    # the text encoder replayed too: the prompt and the empty negative prompt, one shape
    assert parts == {"CLIPTextModel": (1, 4)}
    if config.methods:
        assert not np.array_equal(want, baseline)
    np.testing.assert_array_equal(generate(tiny_pipe, PROMPT, STEPS), baseline)  # removed exactly
    assert "forward" not in vars(tiny_pipe.unet) and "forward" not in vars(tiny_pipe.text_encoder)
    assert "set_timesteps" not in vars(tiny_pipe.scheduler) and not rest.parts


# --- which graph each call replays ---------------------------------------------------------------
def test_deepcache_full_and_partial_steps(tiny_pipe):
    backend = FakeBackend()
    acc = _graphed(tiny_pipe, Config(deepcache=DeepCache(3, 0)), backend)
    try:
        generate(acc, PROMPT, STEPS)
        generate(acc, PROMPT, STEPS)
        kinds = [k[0][1] for k in acc.graphs.stats.kinds]
    finally:
        acc.remove()
    one_call = ["full", "partial", "partial"] * 2 + ["full", "partial"]
    assert kinds == one_call * 2  # every call starts a fresh DeepCache schedule
    assert acc.graphs is None and backend.captures == 2 + 1  # full, partial; the text encoder


def test_tgate_kinds_follow_its_schedule(tiny_pipe):
    backend = FakeBackend()
    acc = _graphed(tiny_pipe, Config(tgate=TGATE), backend)
    try:
        generate(acc, PROMPT, STEPS)
        stats = acc.graphs.stats
        kinds = list(stats.kinds)
        keys = list(acc.graphs.graphs)
        shapes = {key[2][0][0] for key in keys}  # the sample's shape in each graph's key
    finally:
        acc.remove()
    assert len(kinds) == STEPS
    # before the gate the CFG batch is 2, after it 1: both shapes were captured
    assert shapes == {(2, 4, 16, 16), (1, 4, 16, 16)}
    assert kinds[0] != kinds[-1]  # T-GATE's flags differ before and after the gate
    # one capture per kind and cache state (which caches exist decides reuse in Python), none repeated
    assert stats.captures == len(keys) >= len(set(kinds))


def test_new_shape_recaptures_and_keeps_the_old_graphs(tiny_pipe):
    backend = FakeBackend()
    config = Config(deepcache=DeepCache(3, 0))
    with Accelerated(tiny_pipe, config) as eager:
        want_two = generate(eager, PROMPT * 2, STEPS)
        want_one = generate(eager, PROMPT, STEPS)
    acc = _graphed(tiny_pipe, config, backend)
    stats = acc.graphs.stats
    try:
        generate(acc, PROMPT, STEPS)
        assert stats.captures == 2
        got_two = generate(acc, PROMPT * 2, STEPS)  # new batch: its full step captured, then partial
        assert stats.captures == 4
        assert backend.captures == 4 + 2  # and the text encoder's graphs of both prompt batches
        got_one = generate(acc, PROMPT, STEPS)  # the first shape's graphs again, cache handed back
        assert stats.captures == 4 and backend.captures == 6
    finally:
        acc.remove()
    np.testing.assert_array_equal(got_two, want_two)
    np.testing.assert_array_equal(got_one, want_one)


def test_replay_runs_no_capture_time_python_twice(tiny_pipe):
    """Warm-up side effects are undone before the capture: a random generator drawn from in the
    warm-up is put back, so the captured step draws what the eager step draws."""
    gen = torch.Generator().manual_seed(0)
    calls = []

    class Unet(torch.nn.Module):
        def forward(self, x):
            calls.append(1)
            return x + torch.rand(x.shape, generator=gen)

    unet = Unet()
    graphs = StepGraphs(unet, generators=lambda: [gen], backend=FakeBackend())
    x = torch.zeros(3)
    with graphs.installed():
        out = unet(x)
    assert torch.equal(out, torch.rand(3, generator=torch.Generator().manual_seed(0)))
    assert len(calls) == 3  # warm-up, capture, replay
    assert "forward" not in vars(unet)


def test_close_frees_graphs_and_restores_forward(tiny_pipe):
    acc = _graphed(tiny_pipe, Config(deepcache=DeepCache(2, 1)), FakeBackend())
    graphs = acc.graphs
    generate(acc, PROMPT, 4)
    assert graphs.graphs
    acc.remove()
    assert not graphs.graphs and not graphs.is_installed
    assert "forward" not in vars(tiny_pipe.unet)


def test_a_step_decides_before_what_computes_it_beneath_every_wrapper():
    """Step: installed over the module's own forward, wrapped by what comes after (a graph mode's
    StepGraphs, DeepCache's counter), it decides the step's kind right before ``compute`` runs; removed,
    the module's forward is what it was."""
    from optimize.runtime.graphs import Step

    module, order = torch.nn.Linear(2, 2), []
    step = Step(module, decide=lambda: order.append("decide")).install()
    own = step.own
    step.compute = lambda x: order.append("compute") or own(x)
    outer = module.forward
    module.forward = lambda x: order.append("wrapper") or outer(x)  # a lever's wrapper over it
    x = torch.ones(1, 2)
    torch.testing.assert_close(module(x), own(x))
    assert order == ["wrapper", "decide", "compute"]
    del module.forward
    step.uninstall()
    assert "forward" not in vars(module) and step.own is None
    step.uninstall()  # idempotent
    with pytest.raises(RuntimeError, match="installed"):
        step.install().install()


# --- the evaluator in a graph mode ---------------------------------------------------------------
class _Scorer:
    def score(self, images, prompts):
        return np.ones(len(images))


def test_evaluator_applies_once_and_captures_the_baseline_untouched(tiny_pipe, monkeypatch):
    applies = []
    original = Accelerated.apply
    monkeypatch.setattr(Accelerated, "apply", lambda self: applies.append(self.config) or original(self))
    settings = GenerationSettings(steps=4, guidance=7.5, height=64, width=64, batch_size=1)
    backend = FakeBackend()
    ev = Evaluator(tiny_pipe, _Scorer(), PROMPT * 3, settings, repeats=2, scored_repeats=3, exec="graphs",
                   graph_backend=backend)
    config = Config(deepcache=DeepCache(2, 0))
    try:
        m = ev.measure(config)
        base_graphs = dict(ev.baseline_graphs.graphs)
        ev.measure(Config(tome=ToMe(0.5, 1)))
        # the text encoder's and the decode's graphs serve the baseline and both configurations
        shared = [(p.stats.captures, p.is_installed) for p in ev.pipeline_graphs.parts]
    finally:
        ev.close()
    assert shared == [(1, False)]
    assert applies == [config, Config(tome=ToMe(0.5, 1))]  # one application per measurement
    assert len(m.reference.samples) == 3 and len(m.timing.samples) == 3
    assert len(base_graphs) == 1  # the baseline's one kind, captured before anything was applied
    assert ev.baseline_graphs.graphs == {}
    # paired eager and graphed baselines compute the same images
    eager = Evaluator(tiny_pipe, _Scorer(), PROMPT, settings, repeats=0)
    graphed = Evaluator(tiny_pipe, _Scorer(), PROMPT, settings, repeats=0, exec="graphs", graph_backend=FakeBackend())
    a = np.asarray(eager.measure(Config(), paired=False).images[0])
    b = np.asarray(graphed.measure(Config(), paired=False).images[0])
    graphed.close()
    np.testing.assert_array_equal(a, b)


def test_baseline_graphs_refuse_a_capture_on_a_touched_pipeline(tiny_pipe):
    settings = GenerationSettings(steps=4, guidance=7.5, height=64, width=64)
    ev = Evaluator(tiny_pipe, _Scorer(), PROMPT, settings, repeats=1, exec="graphs", graph_backend=FakeBackend())
    with Accelerated(tiny_pipe, Config(deepcache=DeepCache(2, 0))):
        with pytest.raises(GraphUnsupported, match="untouched"):
            with ev._untouched() as pipe:
                generate(pipe, PROMPT, 4)
    ev.close()
    assert "forward" not in vars(tiny_pipe.unet)


def test_time_eager_bypasses_the_graphs(tiny_pipe):
    settings = GenerationSettings(steps=3, guidance=7.5, height=64, width=64)
    backend = FakeBackend()
    ev = Evaluator(tiny_pipe, _Scorer(), PROMPT, settings, repeats=1, exec="graphs", graph_backend=backend)
    timing = ev.time_eager(2)
    assert len(timing.samples) == 2 and backend.captures == 0
    ev.close()


def test_the_schedule_stays_on_the_host_while_installed(tiny_pipe):
    """diffusers puts the timesteps on the pipeline's device; DDIM's step then synchronizes every step.
    Installed, set_timesteps ignores the device (asked for one this CPU machine does not have)."""
    scheduler = tiny_pipe.scheduler
    with PipelineGraphs(tiny_pipe, backend=FakeBackend()).installed():
        scheduler.set_timesteps(4, device="cuda")
        assert scheduler.timesteps.device.type == "cpu" and len(scheduler.timesteps) == 4
        import inspect

        assert "device" in inspect.signature(scheduler.set_timesteps).parameters  # retrieve_timesteps reads it
    assert "set_timesteps" not in vars(scheduler)


def test_a_capture_that_fails_is_a_graph_unsupported_with_the_reason(tiny_pipe):
    class Refusing(FakeBackend):
        def capture(self, run, generators, slots):
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

    acc = Accelerated(tiny_pipe, Config(deepcache=DeepCache(2, 0)), exec="graphs", graph_backend=Refusing())
    with acc, pytest.raises(GraphUnsupported, match=r"CLIPTextModel\.forward failed: operation not permitted"):
        generate(acc, PROMPT, 4)
    assert "forward" not in vars(tiny_pipe.text_encoder) and "forward" not in vars(tiny_pipe.unet)


# --- bad input -----------------------------------------------------------------------------------
def test_graph_modes_need_cuda(tiny_pipe):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_exec("graphs", "cpu")
    with pytest.raises(ValueError, match="must be one of"):
        check_exec("fast", "cuda")
    check_exec("eager", "cpu")
    check_exec("compile", "cuda:1")
    with pytest.raises(InvalidConfig, match="CUDA"):  # a value the caller chose: InvalidConfig, as documented
        Accelerated(tiny_pipe, Config(deepcache=DeepCache(2, 0)), exec="graphs").apply()
    assert "forward" not in vars(tiny_pipe.unet) and "_optimize_sd_applied" not in vars(tiny_pipe)


def test_partial_steps_leave_the_deep_attention_caches_alone(tiny_pipe):
    """DeepCache's partial step does not run the deep attentions: replaying it must not hand back
    their T-GATE caches as they were when it was captured (a later full step has refreshed them)."""
    config = Config(deepcache=DeepCache(3, 1), tgate=TGate(10, 3, 2, 2))
    with Accelerated(tiny_pipe, config) as eager:
        want = generate(eager, PROMPT, 20)
    acc = _graphed(tiny_pipe, config, FakeBackend())
    try:
        got = [generate(acc, PROMPT, 20) for _ in range(2)]
    finally:
        acc.remove()
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(got[1], want)


def test_the_gpu_benchmark_imports_and_refuses_a_cpu(tmp_path):
    """benchmarks/gpu_graphs.py runs only where CUDA is; here it must import and say so in one line."""
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    import os

    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "gpu_graphs.py")
    out = subprocess.run([sys.executable, script, "--parts", "equal", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == "gpu_graphs.py needs a CUDA device"
    bad = subprocess.run([sys.executable, script, "--parts", "nope"], capture_output=True,
                         text=True, timeout=120)
    assert "unknown part(s): nope" in bad.stderr
