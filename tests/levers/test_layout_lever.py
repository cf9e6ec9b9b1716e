"""The layout lever: the lever contract (tests/levers/contract.py), then what each of its choices does
to the UNet and how exactly removal takes it back. (tests/test_layout.py is the package layout's.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import generate
from contract import PROMPT, LeverContract, assert_clean, assert_same_state, unet_state

import optimize
from optimize.levers import BY_NAME, Config, Context, Device, InvalidConfig, Layout
from optimize.levers.layout import sdpa_here

LEVER = BY_NAME["layout"]


class TestLayoutContract(LeverContract):
    lever = LEVER
    on = Layout(channels_last=True, fused_qkv=True, sdpa="math")


class TestLayoutContractXL(LeverContract):
    lever = LEVER
    on = Layout(channels_last=True, fused_qkv=True, sdpa="math")
    pipe_name = "tiny-xl"


def _attentions(unet):
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


def _unet_out(unet):
    torch.manual_seed(0)
    c = unet.config
    sample = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), torch.randn(2, 77, c.cross_attention_dim)).sample


def test_channels_last_converts_the_convolutions_and_puts_the_same_tensors_back(tiny_pipe):
    convs = {n: p for n, p in tiny_pipe.unet.named_parameters() if p.dim() == 4}
    before = {n: p.data_ptr() for n, p in convs.items()}
    with optimize.accelerate(tiny_pipe, Config(layout=Layout(True, False, "default"))):
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs.values())
        assert any(not p.is_contiguous() for p in convs.values())  # 1x1 kernels are both at once
    assert all(p.is_contiguous() and p.data_ptr() == before[n] for n, p in convs.items())


def test_fused_qkv_fuses_and_removal_puts_back_processors_and_modules(tiny_pipe):
    unet = tiny_pipe.unet
    attentions = _attentions(unet)
    processors = [a.processor for a in attentions]
    reference = _unet_out(unet)
    with optimize.accelerate(tiny_pipe, Config(layout=Layout(False, True, "default"))):
        assert all(hasattr(a, "to_qkv") or hasattr(a, "to_kv") for a in attentions)
        assert {type(a.processor).__name__ for a in attentions} == {"FusedAttnProcessor2_0"}
        fused = _unet_out(unet)
    # the tolerance the module docstring states: on the CPU the fused matmul changed no bit
    assert (fused - reference).abs().max() / reference.abs().max() <= 1e-5
    assert all(a.processor is p for a, p in zip(attentions, processors))
    assert not any({"to_qkv", "to_kv"} & set(a._modules) or a.fused_projections for a in attentions)
    assert "original_attn_processors" not in vars(unet)
    assert torch.equal(_unet_out(unet), reference)


def test_sdpa_kernel_is_the_unets_alone(tiny_pipe):
    """With sdpa=math, the UNet's attentions run with only the math kernel enabled; the text encoder
    before and the pipeline after keep every kernel."""
    seen = {}

    def record(where):
        def hook(*args):
            seen.setdefault(where, (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return hook

    handles = [_attentions(tiny_pipe.unet)[0].register_forward_hook(record("unet")),
               tiny_pipe.text_encoder.register_forward_hook(record("text"))]
    try:
        with optimize.accelerate(tiny_pipe, Config(layout=Layout(False, False, "math"))) as fast:
            generate(fast, PROMPT, 2)
    finally:
        for h in handles:
            h.remove()
    assert seen == {"unet": (False, True), "text": (True, True)}
    assert torch.backends.cuda.flash_sdp_enabled()


def test_a_kernel_that_cannot_run_fails_the_call_and_leaves_the_kernels_as_they_were(tiny_pipe):
    """A kernel the inputs do not suit raises at the first attention (validation keeps it out of a
    CPU run; applied without it here); the kernel flags are back all the same."""
    applied = LEVER.apply(tiny_pipe, Layout(False, False, "efficient"), {})
    try:
        with pytest.raises(RuntimeError, match="No viable backend"):
            generate(tiny_pipe, PROMPT, 2)
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    finally:
        applied.remove()
    assert not tiny_pipe.unet._forward_hooks and not tiny_pipe.unet._forward_pre_hooks


def test_the_kernels_offered_are_those_that_run_there():
    cpu = Context(device=Device("cpu"))
    hopper = Context(device=Device("cuda", (9, 0)), dtype="float16")
    assert sdpa_here(cpu) == ("default", "flash", "math")
    assert sdpa_here(hopper) == ("default", "flash", "efficient", "cudnn", "math")
    assert sdpa_here(Context(device=Device("cuda", (7, 5)), dtype="float16")) == ("default", "efficient", "math")
    assert sdpa_here(Context(device=Device("cuda", (9, 0)), dtype="float32")) == ("default", "efficient", "math")
    assert sdpa_here(Context()) == ("default", "flash", "efficient", "cudnn", "math")  # not known yet
    for kernel in ("efficient", "cudnn"):
        with pytest.raises(InvalidConfig, match=r"layout\.sdpa"):
            LEVER.validate(Layout(sdpa=kernel), cpu)
    LEVER.validate(Layout(sdpa="cudnn"), hopper)


def test_every_setting_off_is_refused_and_never_drawn():
    """Layout(False, False, "default") is the untouched UNet: a trial of it would time noise."""
    ctx = Context(steps=20)
    with pytest.raises(InvalidConfig, match=r"layout\.channels_last.*switch layout off"):
        LEVER.validate(Layout(False, False, "default"), ctx)
    LEVER.validate(Layout(False, False, "math"), ctx)
    grid = list(LEVER.grid(ctx))
    assert Layout(False, False, "default") not in grid and Layout(False, False, "flash") in grid
    assert len(grid) == 2 * 2 * len(sdpa_here(ctx)) - 1


def test_labels():
    assert LEVER.label(Layout(True, True, "flash")) == "cl+qkv+flash"
    assert LEVER.label(Layout(False, True, "default")) == "qkv"
    assert LEVER.label(Layout(False, False, "default")) == "layout"


def test_with_every_lever_before_it_removal_is_exact(tiny_pipe):
    """Layout after DeepCache, ToMe and T-GATE (which swap forwards): all of it comes off."""
    baseline = generate(tiny_pipe, PROMPT, 8)
    before = unet_state(tiny_pipe)
    params = {"deepcache": True, "tome": True, "tgate": True, "tgate.gate_step": 4, "tgate.warm_up": 1,
              "layout": True, "layout.sdpa": "math"}
    with optimize.accelerate(tiny_pipe, params) as fast:
        out = generate(fast, PROMPT, 8)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(generate(tiny_pipe, PROMPT, 8), baseline)
    assert_clean(tiny_pipe)
    assert_same_state(tiny_pipe, before)
