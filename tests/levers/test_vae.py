"""The vae lever: the lever contract on tiny-xl in fp16 (whose VAE the SDXL pipeline upcasts), where
it applies, and the overflow it must report instead of returning black images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import generate, make_pipe
from contract import PROMPT, LeverContract, context

import optimize
from optimize.levers import BY_NAME, Config, Context, InvalidConfig, Vae

LEVER = BY_NAME["vae"]


class TestVaeContract(LeverContract):
    lever = LEVER
    pipe_name = "tiny-xl-fp16"


def test_decodes_in_fp16_during_the_call_only(tiny_xl_fp16_pipe):
    pipe = tiny_xl_fp16_pipe
    own = pipe.vae.config
    seen = []
    handle = pipe.vae.decoder.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    try:
        generate(pipe, PROMPT, 2)
        with optimize.accelerate(pipe, Config(vae=Vae())) as fast:
            generate(fast, PROMPT, 2)
            assert pipe.vae.config is own and pipe.vae.config.force_upcast  # between calls: as it was
            generate(pipe, PROMPT, 2)  # the untouched pipeline, while the configuration is held
    finally:
        handle.remove()
    assert seen == [torch.float32, torch.float16, torch.float32]
    assert pipe.vae.config is own and pipe.vae.dtype == torch.float16


@pytest.mark.parametrize("fixture", ["tiny_pipe", "tiny_xl_pipe"])
def test_refused_where_the_vae_is_not_upcast(request, fixture):
    """SD pipelines never upcast; an fp32 SDXL pipeline has nothing to upcast."""
    pipe = request.getfixturevalue(fixture)
    ctx = context(pipe)
    assert ctx.vae_upcast is False and not LEVER.searchable(ctx) and list(LEVER.grid(ctx)) == []
    with pytest.raises(InvalidConfig, match=r"vae\.fp16_decode does nothing here"):
        optimize.accelerate(pipe, Config(vae=Vae())).apply()


def test_searchable_where_the_vae_is_upcast_or_not_known_yet(tiny_xl_fp16_pipe):
    assert context(tiny_xl_fp16_pipe).vae_upcast is True
    assert LEVER.searchable(Context()) and LEVER.searchable(context(tiny_xl_fp16_pipe))


def test_an_overflowing_vae_fails_the_call_instead_of_black_images():
    """A VAE whose first convolution gives activations beyond fp16's range (as the stock SDXL VAE's
    inner layers do): upcast it decodes, in fp16 the call fails naming the overflow."""
    pipe = make_pipe("tiny-xl", dtype="fp16")
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(30000)
    assert np.isfinite(generate(pipe, PROMPT, 2)).all()
    with optimize.accelerate(pipe, Config(vae=Vae())) as fast:
        with pytest.raises(FloatingPointError, match=r"vae\.fp16_decode: .*NaN or inf.*overflow fp16"):
            generate(fast, PROMPT, 2)
    assert pipe.vae.config.force_upcast and not pipe.vae.decoder._forward_hooks
