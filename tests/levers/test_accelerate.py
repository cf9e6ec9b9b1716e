"""optimize.accelerate across levers: reproducibility, the library crashes it fixes, validation, life cycle, Config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import generate, make_pipe
from contract import assert_clean

import optimize
from optimize import Config, DeepCache, InvalidConfig, Layout, Precision, TGate, ToMe, Vae
from optimize.levers import Context

STEPS = 12
PROMPT = ["a red fox in the snow"]
TGATE_12 = {"tgate.gate_step": 6, "tgate.sp_interval": 2, "tgate.fi_interval": 1, "tgate.warm_up": 1}


def _pipe(request, name):
    return request.getfixturevalue("tiny_xl_pipe" if name == "tiny-xl" else "tiny_pipe")


def _tome_downsample(name):
    return 2 if name == "tiny-xl" else 1  # SDXL has no attention at full resolution


# --- reproducibility and exact removal (each lever and every pair: contract.py, test_combinations.py) ---
def test_repeated_apply_remove(tiny_pipe):
    baseline = generate(tiny_pipe, PROMPT, STEPS)
    params = {
        "deepcache": True, "tome": True, "tome.max_downsample": 1,
        "tgate": True, "tgate.gate_step": 2, "tgate.warm_up": 0,
    }
    outputs = []
    for _ in range(20):
        with optimize.accelerate(tiny_pipe, params) as fast:
            outputs.append(generate(fast, PROMPT, 3))
        assert_clean(tiny_pipe)
    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])
    assert np.array_equal(generate(tiny_pipe, PROMPT, STEPS), baseline)
    assert_clean(tiny_pipe)


def test_tome_reproducible(tiny_pipe):
    cfg = Config(tome=ToMe(ratio=0.5, max_downsample=1))
    with optimize.accelerate(tiny_pipe, cfg) as fast:
        first = generate(fast, PROMPT, STEPS)
        torch.randn(100)  # whatever the global RNG does in between must not matter
        second = generate(fast, PROMPT, STEPS)
    assert np.array_equal(first, second)
    with optimize.accelerate(tiny_pipe, cfg) as fast:  # a fresh application gives the same images
        assert np.array_equal(generate(fast, PROMPT, STEPS), first)


def test_raw_tomesd_is_not_reproducible():
    """Why the reseeding above is needed: tomesd alone keeps advancing its generator."""
    import tomesd

    pipe = make_pipe("tiny")
    tomesd.apply_patch(pipe, ratio=0.5, max_downsample=1)
    assert not np.array_equal(generate(pipe, PROMPT, STEPS), generate(pipe, PROMPT, STEPS))


# --- crashes of the raw libraries that the layer fixes -------------------------------------------
TGATE_50 = dict(num_inference_steps=50, gate_step=10, sp_interval=5, fi_interval=1, warm_up=2)
CRASH_CASES = [  # (pipeline, ToMe on, batch size)
    pytest.param("tiny", True, 1, id="sd-dc+tome+tgate-b1"),
    pytest.param("tiny", False, 4, id="sd-dc+tgate-b4"),
    pytest.param("tiny-xl", True, 1, id="xl-dc+tome+tgate-b1"),
    pytest.param("tiny-xl", False, 4, id="xl-dc+tgate-b4"),
]


def _raw_call(pipe, batch):
    return pipe.tgate(
        PROMPT * batch, generator=torch.Generator("cpu").manual_seed(0), output_type="np", **TGATE_50
    ).images


@pytest.mark.parametrize("name,tome,batch", CRASH_CASES)
def test_raw_libraries_crash_on_second_call(name, tome, batch):
    import tgate
    import tomesd

    pipe = make_pipe(name)  # a throw-away pipeline: the raw libraries leave it broken
    if tome:
        tomesd.apply_patch(pipe, ratio=0.5, max_downsample=_tome_downsample(name))
    loader = tgate.TgateSDXLDeepCacheLoader if name == "tiny-xl" else tgate.TgateSDDeepCacheLoader
    loader(pipe, cache_interval=3, cache_branch_id=0)

    first = _raw_call(pipe, batch)
    assert first.shape[0] == batch
    with pytest.raises(RuntimeError):
        _raw_call(pipe, batch)


@pytest.mark.parametrize(
    "name,tome,batch", CRASH_CASES + [
        pytest.param("tiny", True, 4, id="sd-dc+tome+tgate-b4"),
        pytest.param("tiny-xl", True, 4, id="xl-dc+tome+tgate-b4"),
    ],
)
def test_accelerate_runs_twice_where_raw_libraries_crash(request, name, tome, batch):
    pipe = _pipe(request, name)
    cfg = Config(
        deepcache=DeepCache(cache_interval=3, cache_branch_id=0),
        tome=ToMe(0.5, _tome_downsample(name)) if tome else None,
        tgate=TGate(gate_step=10, sp_interval=5, fi_interval=1, warm_up=2),
    )
    with optimize.accelerate(pipe, cfg) as fast:
        first = generate(fast, PROMPT * batch, 50)
        second = generate(fast, PROMPT * batch, 50)
    assert first.shape[0] == batch and np.isfinite(first).all()
    assert np.array_equal(first, second)
    assert_clean(pipe)


# --- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params,name",
    [
        ({"tgate.gate_step": 0}, "tgate.gate_step"),
        ({"tgate.sp_interval": 0}, "tgate.sp_interval"),
        ({"tgate.fi_interval": 0}, "tgate.fi_interval"),
        ({"tgate.gate_step": 5, "tgate.warm_up": 5}, "tgate.warm_up"),
        ({"tgate.gate_step": 5, "tgate.warm_up": 7}, "tgate.warm_up"),
        ({"tgate.warm_up": -1}, "tgate.warm_up"),
        ({"tome.ratio": 1.2}, "tome.ratio"),
        ({"tome.ratio": 0}, "tome.ratio"),
        ({"tome.max_downsample": 3}, "tome.max_downsample"),
        ({"deepcache.cache_interval": 0}, "deepcache.cache_interval"),
        ({"deepcache.cache_interval": 2.5}, "deepcache.cache_interval"),
        ({"deepcache.cache_branch_id": -1}, "deepcache.cache_branch_id"),
    ],
)
def test_invalid_parameters_refused(tiny_pipe, params, name):
    acc = optimize.accelerate(tiny_pipe, params)
    try:
        with pytest.raises(InvalidConfig, match=name.replace(".", r"\.")):
            acc.apply()
        assert_clean(tiny_pipe)  # a refused configuration touches nothing
    finally:
        acc.remove()  # keeps the shared pipeline usable if the check above fails


def test_tome_noop_on_sdxl_refused(tiny_xl_pipe):
    acc = optimize.accelerate(tiny_xl_pipe, {"tome": True})
    try:
        with pytest.raises(InvalidConfig, match=r"tome\.max_downsample"):
            acc.apply()
    finally:
        acc.remove()


def test_cache_branch_id_bounded_by_unet(tiny_pipe):
    top = Context.of(tiny_pipe).max_branch_id
    assert top == 3 * len(tiny_pipe.unet.down_blocks) - 1
    too_far = optimize.accelerate(tiny_pipe, {"deepcache.cache_branch_id": top + 1})
    try:
        with pytest.raises(InvalidConfig, match=r"deepcache\.cache_branch_id.*0\.\." + str(top)):
            too_far.apply()
    finally:
        too_far.remove()
    baseline = generate(tiny_pipe, PROMPT, 4)
    with optimize.accelerate(tiny_pipe, {"deepcache.cache_branch_id": top}) as fast:  # the largest one runs
        out = generate(fast, PROMPT, 4)
    assert np.isfinite(out).all() and not np.array_equal(out, baseline)


@pytest.mark.parametrize("params", [None, ["deepcache"], "deepcache", 3])
def test_params_that_are_no_mapping_refused(tiny_pipe, params):
    with pytest.raises(InvalidConfig, match="params must be a mapping"):
        optimize.accelerate(tiny_pipe, params)


def test_unknown_parameter_refused():
    with pytest.raises(InvalidConfig, match="deepcache.interval"):
        Config.from_params({"deepcache": True, "deepcache.interval": 3})
    with pytest.raises(InvalidConfig, match="tgate"):
        Config.from_params({"tgate": "yes"})


def test_gate_step_checked_against_steps_at_call(tiny_pipe):
    with optimize.accelerate(tiny_pipe, {"tgate.gate_step": 6, "tgate.warm_up": 1}) as fast:
        with pytest.raises(InvalidConfig, match=r"tgate\.gate_step.*steps"):
            generate(fast, PROMPT, 6)
        with pytest.raises(InvalidConfig, match=r"tgate\.gate_step"):
            generate(fast, PROMPT, 4)
        assert np.isfinite(generate(fast, PROMPT, 7)).all()  # still usable after a refused call
    assert_clean(tiny_pipe)


@pytest.mark.parametrize("guidance", [1.0, 0.5])
def test_tgate_needs_guidance(tiny_pipe, guidance):
    with optimize.accelerate(tiny_pipe, {"tgate": True, **TGATE_12}) as fast:
        with pytest.raises(InvalidConfig, match="guidance"):
            generate(fast, PROMPT, STEPS, guidance_scale=guidance)
    # without T-GATE, no guidance is fine
    with optimize.accelerate(tiny_pipe, {"deepcache": True}) as fast:
        assert np.isfinite(generate(fast, PROMPT, 4, guidance_scale=1.0)).all()


# --- life cycle ----------------------------------------------------------------------------------
def test_apply_twice_raises_remove_twice_safe(tiny_pipe):
    baseline = generate(tiny_pipe, PROMPT, 4)
    acc = optimize.accelerate(tiny_pipe, {"deepcache": True, "tome": True})
    acc.apply()
    try:
        with pytest.raises(RuntimeError, match="already applied"):
            acc.apply()
        other = optimize.accelerate(tiny_pipe, {"tgate": True})
        with pytest.raises(RuntimeError, match="another configuration"):
            other.apply()
        other.remove()  # never applied: a no-op that must not undo the first one
        assert "_tome_info" in vars(tiny_pipe.unet)
        assert not np.array_equal(generate(acc, PROMPT, 4), baseline)
    finally:
        acc.remove()
    acc.remove()
    assert_clean(tiny_pipe)
    assert np.array_equal(generate(tiny_pipe, PROMPT, 4), baseline)
    with pytest.raises(RuntimeError, match="not applied"):
        generate(acc, PROMPT, 4)


def test_failed_apply_restores(tiny_pipe, monkeypatch):
    """A library that fails half-way through its own patch: that lever and those applied before it
    are removed again."""
    import tomesd

    def broken_patch(pipe, **kwargs):
        pipe.unet._tome_info = {"hooks": []}  # half-done patch, then failure
        raise RuntimeError("patch failed")

    monkeypatch.setattr(tomesd, "apply_patch", broken_patch)
    baseline = generate(tiny_pipe, PROMPT, 4)
    with pytest.raises(RuntimeError, match="patch failed"):
        optimize.accelerate(tiny_pipe, {"deepcache": True, "tome": True, "tgate": True}).apply()
    assert_clean(tiny_pipe)
    assert np.array_equal(generate(tiny_pipe, PROMPT, 4), baseline)


def test_exit_on_exception_restores(tiny_pipe):
    baseline = generate(tiny_pipe, PROMPT, 4)
    with pytest.raises(KeyError):
        with optimize.accelerate(tiny_pipe, {"deepcache": True, "tome": True, "tgate": True, **TGATE_12}):
            raise KeyError("user error")
    assert_clean(tiny_pipe)
    assert np.array_equal(generate(tiny_pipe, PROMPT, 4), baseline)


# --- Config --------------------------------------------------------------------------------------
def test_params_round_trip():
    full = Config(deepcache=DeepCache(4, 2), tome=ToMe(0.35, 2), tgate=TGate(8, 3, 2, 1))
    params = full.to_params()
    assert params == {
        "schedule": False, "deepcache": True, "deepcache.cache_interval": 4, "deepcache.cache_branch_id": 2,
        "tome": True, "tome.ratio": 0.35, "tome.max_downsample": 2,
        "tgate": True, "tgate.gate_step": 8, "tgate.sp_interval": 3, "tgate.fi_interval": 2, "tgate.warm_up": 1,
        "layout": False, "precision": False, "vae": False, "compile": False,
    }
    assert Config.from_params(params) == full
    for cfg in (Config(), Config(tome=ToMe()), Config(deepcache=DeepCache(), tgate=TGate())):
        assert Config.from_params(cfg.to_params()) == cfg
    off = {"schedule": False, "deepcache": False, "tome": False, "tgate": False, "layout": False, "precision": False,
           "vae": False, "compile": False}
    assert Config().to_params() == off
    new = Config(layout=Layout(True, False, "flash"), precision=Precision("fp8"), vae=Vae())
    assert new.to_params() == {**off, "layout": True, "layout.channels_last": True, "layout.fused_qkv": False,
                               "layout.sdpa": "flash", "precision": True, "precision.mode": "fp8",
                               "vae": True, "vae.fp16_decode": True}
    assert Config.from_params(new.to_params()) == new
    # params stored before these levers existed still read
    assert Config.from_params({"deepcache": True, "deepcache.cache_interval": 4}).methods == ("deepcache",)


def test_from_params_switches():
    # a method is on if any of its parameters is given, unless switched off explicitly
    assert Config.from_params({"deepcache.cache_interval": 5}) == Config(deepcache=DeepCache(5, 0))
    assert Config.from_params({"tome": False, "tome.ratio": 0.3}) == Config()
    assert Config.from_params({"tgate": True}) == Config(tgate=TGate())
    assert Config.from_params({"tgate": True}).methods == ("tgate",)


def test_label():
    assert Config().label() == "baseline"
    assert Config(deepcache=DeepCache(3, 0), tome=ToMe(0.5, 2), tgate=TGate(10, 5, 1, 2)).label() == (
        "dc(3,b0)+tome(0.5,md2)+tgate(10,sp5,fi1,w2)"
    )
    assert Config(tome=ToMe(0.25, 4)).label() == "tome(0.25,md4)"
    assert Config(deepcache=DeepCache(2, 5), tgate=TGate(12, 2, 3, 0)).label() == "dc(2,b5)+tgate(12,sp2,fi3,w0)"
    assert Config(deepcache=DeepCache(3, 0), layout=Layout(True, True, "flash"), precision=Precision("fp8"),
                  vae=Vae()).label() == "dc(3,b0)+cl+qkv+flash+fp8+vae16"
