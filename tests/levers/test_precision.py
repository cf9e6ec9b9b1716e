"""The precision lever: the lever contract with torchao's int8 on the CPU (where torchao is installed)
and, everywhere, with a stand-in for torchao that replaces the weights as torchao does, for int8 and
for fp8 (whose bf16 path runs on the CPU; its float8 kernels need a GPU of compute capability 8.9)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from conftest import generate
from contract import PROMPT, LeverContract, assert_clean, assert_same_state, unet_state

import optimize
from optimize.levers import BY_NAME, Config, Context, Device, InvalidConfig, Precision
from optimize.levers import precision as precision_module

LEVER = BY_NAME["precision"]
HAS_TORCHAO = precision_module.torchao_missing() is None


def fake_quantize(linear, mode: str) -> None:
    """What torchao's quantize_ does to a Linear, on any device: a new weight Parameter (here the
    weight rounded to 255 levels per row) and an instance ``extra_repr``; fp8 refuses non-bf16
    weights as torchao's per-row float8 does."""
    w = linear.weight.detach()
    if mode == "fp8":
        assert w.dtype == torch.bfloat16, "PerRow quantization only works for bfloat16 precision input weight"
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
    linear.weight = torch.nn.Parameter((torch.round(w / scale) * scale).to(w.dtype), requires_grad=False)
    linear.extra_repr = types.MethodType(lambda self: "fake-quantized", linear)


@pytest.fixture
def fake_torchao(monkeypatch):
    monkeypatch.setattr(precision_module, "torchao_missing", lambda: None)
    monkeypatch.setattr(precision_module, "quantize", fake_quantize)


@pytest.fixture
def fp8_here(monkeypatch):
    monkeypatch.setattr(precision_module, "fp8_runs", lambda device: True)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install 'optimize-sd[gpu]')")
class TestPrecisionContract(LeverContract):
    """torchao's own int8 dynamic quantization, run on the CPU."""

    lever = LEVER
    on = Precision("int8")


@pytest.mark.usefixtures("fake_torchao")
class TestPrecisionFakeInt8Contract(LeverContract):
    lever = LEVER
    on = Precision("int8")


@pytest.mark.usefixtures("fake_torchao", "fp8_here")
class TestPrecisionFakeFp8Contract(LeverContract):
    lever = LEVER
    on = Precision("fp8")


def test_only_the_transformer_blocks_linears_are_quantized(tiny_pipe, fake_torchao):
    unet = tiny_pipe.unet
    chosen = {id(m) for m in precision_module.token_linears(unet)}
    linears = {name: m for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert chosen and len(chosen) < len(linears)
    assert not any(id(m) in chosen for name, m in linears.items() if name.startswith("time_embedding"))
    weights = {name: m.weight for name, m in linears.items()}
    applied = LEVER.apply(tiny_pipe, Precision("int8"), {})
    try:
        swapped = {name for name, m in linears.items() if m.weight is not weights[name]}
        assert swapped == {name for name, m in linears.items() if id(m) in chosen}
    finally:
        applied.remove()
    assert all(m.weight is weights[name] for name, m in linears.items())


def test_fp8_layers_compute_in_bf16_between_casts(tiny_pipe, fake_torchao, fp8_here):
    """The UNet's dtype in and out of each quantized layer, bf16 inside; the rest of the UNet untouched."""
    layer = precision_module.token_linears(tiny_pipe.unet)[0]
    inside, outside = [], []
    before = unet_state(tiny_pipe)
    first = layer.register_forward_hook(lambda m, args, out: inside.append((args[0].dtype, out.dtype)))
    try:
        with optimize.accelerate(tiny_pipe, Config(precision=Precision("fp8"))) as fast:
            # hooks run in the order they were registered: this one after the lever's cast back
            last = layer.register_forward_hook(lambda m, args, out: outside.append(out.dtype))
            assert layer.weight.dtype == torch.bfloat16 and tiny_pipe.unet.conv_in.weight.dtype == torch.float32
            out = generate(fast, PROMPT, 2)
            last.remove()
    finally:
        first.remove()
    assert np.isfinite(out).all()
    assert set(inside) == {(torch.bfloat16, torch.bfloat16)} and set(outside) == {torch.float32}
    assert not layer._forward_pre_hooks and not layer._forward_hooks
    assert_same_state(tiny_pipe, before)


def test_a_quantize_that_fails_half_way_puts_back_what_it_did(tiny_pipe, monkeypatch):
    baseline = generate(tiny_pipe, PROMPT, 2)
    before = unet_state(tiny_pipe)
    calls = []

    def failing(linear, mode):
        calls.append(linear)
        if len(calls) == 3:
            raise RuntimeError("quantize failed")
        fake_quantize(linear, mode)

    monkeypatch.setattr(precision_module, "torchao_missing", lambda: None)
    monkeypatch.setattr(precision_module, "quantize", failing)
    with pytest.raises(RuntimeError, match="quantize failed"):
        optimize.accelerate(tiny_pipe, Config(precision=Precision("int8"))).apply()
    assert_same_state(tiny_pipe, before)
    assert_clean(tiny_pipe)
    np.testing.assert_array_equal(generate(tiny_pipe, PROMPT, 2), baseline)


def test_unavailable_without_torchao_or_off_cuda_and_cpu(monkeypatch):
    monkeypatch.setattr(precision_module, "torchao_missing", lambda: "torchao is not installed (pip install ...)")
    assert "torchao is not installed" in LEVER.unavailable(Context(device=Device("cpu")))
    with pytest.raises(InvalidConfig, match="precision: torchao is not installed"):
        LEVER.validate(Precision("int8"), Context(device=Device("cpu")))
    monkeypatch.setattr(precision_module, "torchao_missing", lambda: None)
    assert LEVER.unavailable(Context(device=Device("cpu"))) is None
    assert LEVER.unavailable(Context(device=Device("cuda", (8, 0)))) is None
    assert "mps" in LEVER.unavailable(Context(device=Device("mps")))


def test_fp8_only_where_float8_runs(monkeypatch):
    monkeypatch.setattr(precision_module, "torchao_missing", lambda: None)
    field = precision_module.Precision.__dataclass_fields__["mode"].metadata["search"]
    ada, ampere, cpu = Device("cuda", (8, 9)), Device("cuda", (8, 0)), Device("cpu")
    assert field.grid(Context(device=ada)) == ["int8", "fp8"]
    assert field.grid(Context(device=ampere)) == field.grid(Context(device=cpu)) == ["int8"]
    LEVER.validate(Precision("fp8"), Context(device=Device("cuda", (9, 0))))
    for device, where in ((ampere, r"compute capability \(8, 0\)"), (cpu, "cpu")):
        with pytest.raises(InvalidConfig, match=rf"precision\.mode fp8 needs .*8\.9.*{where}"):
            LEVER.validate(Precision("fp8"), Context(device=device))


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install 'optimize-sd[gpu]')")
def test_torchao_int8_after_fused_qkv_quantizes_the_fused_layers(tiny_pipe):
    """The layout comes first in the registry: the fused projections are made from the full-precision
    weights, then quantized like the others; both come off."""
    baseline = generate(tiny_pipe, PROMPT, 2)
    before = unet_state(tiny_pipe)
    with optimize.accelerate(tiny_pipe, {"layout": True, "layout.channels_last": False, "precision": True}) as fast:
        fused = [m.to_qkv for m in tiny_pipe.unet.modules() if hasattr(m, "to_qkv")]
        assert fused and {type(m.weight).__name__ for m in fused} == {"Int8Tensor"}
        assert np.isfinite(generate(fast, PROMPT, 2)).all()
    assert_same_state(tiny_pipe, before)
    np.testing.assert_array_equal(generate(tiny_pipe, PROMPT, 2), baseline)
