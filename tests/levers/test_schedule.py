"""The schedule lever keeps the lever contract (tests/levers/contract.py)."""

from contract import LeverContract

from optimize.levers import BY_NAME


class TestScheduleContract(LeverContract):
    lever = BY_NAME["schedule"]


# --- what the schedule does beyond the contract ---------------------------------------------------------
import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import generate  # noqa: E402
from contract import PROMPT, assert_clean  # noqa: E402
from fakegraphs import FakeBackend  # noqa: E402

import optimize  # noqa: E402
from optimize.levers import Accelerated, Config, Schedule  # noqa: E402
from optimize.runtime.pipelines import scheduler_for  # noqa: E402


def _unet_calls(pipe):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_a_call_runs_the_solver_at_its_steps_whatever_the_caller_asks(tiny_pipe):
    own, config_before = tiny_pipe.scheduler, dict(tiny_pipe.config)
    # the same solver and steps set on the pipeline by hand
    tiny_pipe.scheduler = scheduler_for(own, "dpm++")
    try:
        want = generate(tiny_pipe, PROMPT, 6)
    finally:
        tiny_pipe.scheduler = own
    calls, handle = _unet_calls(tiny_pipe)
    try:
        with optimize.accelerate(tiny_pipe, {"schedule": True, "schedule.solver": "dpm++", "schedule.steps": 6}) as fast:
            got = generate(fast, PROMPT, 50)  # called as the 50-step reference is called
    finally:
        handle.remove()
    np.testing.assert_array_equal(got, want)
    assert len(calls) == 6
    # the pipeline's own scheduler: the same object, class and config, and the pipeline's config unchanged
    assert tiny_pipe.scheduler is own and type(own).__name__ == "DDIMScheduler"
    assert dict(tiny_pipe.config) == config_before
    assert_clean(tiny_pipe)


def test_karras_sigmas_are_set_and_unset_by_name(tiny_pipe):
    karras = scheduler_for(tiny_pipe.scheduler, "dpm++karras")
    assert karras.config.use_karras_sigmas
    assert not scheduler_for(karras, "dpm++").config.use_karras_sigmas  # from_config would carry them over


def test_graph_modes_keep_the_solvers_schedule_on_the_host(tiny_pipe):
    config = Config(schedule=Schedule("unipc", 5))
    acc = Accelerated(tiny_pipe, config, exec="graphs", graph_backend=FakeBackend()).apply()
    solver = acc.applied["schedule"].solver
    devices = []
    original = type(solver).set_timesteps

    def spy(self, num_inference_steps=None, device=None, **kwargs):
        devices.append(device)
        return original(self, num_inference_steps, device, **kwargs)

    try:
        type(solver).set_timesteps = spy
        generate(acc, PROMPT, 12)
        assert devices == [None], devices  # no device: the timesteps stay on the CPU
        assert "set_timesteps" not in vars(solver)  # the host schedule is the call's only
    finally:
        type(solver).set_timesteps = original
        acc.remove()
    assert_clean(tiny_pipe)


def test_paired_baseline_calls_run_the_reference_schedule(tiny_pipe):
    """In a graph mode the configuration stays applied for the whole measurement and the baseline calls
    between its calls go to the untouched pipeline: they must run the reference's steps and solver."""
    from optimize.measure.evaluator import Evaluator, GenerationSettings

    settings = GenerationSettings(steps=12, guidance=7.5, height=64, width=64, seed=0)
    evaluator = Evaluator(tiny_pipe, None, PROMPT, settings, repeats=2, exec="graphs", graph_backend=FakeBackend())
    try:
        timed, base = evaluator.time(Config(schedule=Schedule("dpm++", 4)))
    finally:
        evaluator.close()
    # a call is cut at every UNet call: steps + 1 segments
    assert {len(s) for s in timed.segments} == {5} and {len(s) for s in base.segments} == {13}
    assert_clean(tiny_pipe)
    assert type(tiny_pipe.scheduler).__name__ == "DDIMScheduler" and torch.is_tensor(tiny_pipe.scheduler.alphas_cumprod)
