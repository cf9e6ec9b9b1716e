"""Precision: torchao's dynamic quantization of the UNet's token-wise ``Linear`` layers.

* ``int8``: int8 weights (per output channel) and int8 activations quantized per token at every call
  (``Int8DynamicActivationInt8WeightConfig``); runs on CUDA and on the CPU. The layers keep their
  dtype: torchao accumulates in int32 and rescales in fp32 where the dtype is fp16.
* ``fp8``: float8 e4m3 weights and activations, scaled per row
  (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``); needs an NVIDIA GPU of
  compute capability 8.9 or later (Ada, Hopper). Per-row float8 takes bf16 weights only, so in an
  fp16 UNet each quantized layer holds its weight and bias in bf16 and casts its input to bf16 and its
  output back: the rest of the UNet stays as it was, and the layers' own Parameters come back on
  removal.

Which layers: those inside the UNet's transformer blocks (attention projections, feed-forward,
projections in and out), where the rows are tokens. The time-embedding layers run on one row per
image, where quantizing the activations at each call costs more than the matmul it shrinks.
Convolutions are not quantized (torchao quantizes ``Linear`` layers).

Speed: without ``torch.compile`` the quantize / matmul / rescale steps run as separate kernels and
usually cost more than they save (int8 on a shared 2-core CPU: a 12-step call of the testbed took
1.12 s against 0.96 s, best of 3), and torchao's int8 cannot be captured into a CUDA graph; so the
search draws it only in trials that compile the UNet (``requires``), where they fuse. Applied by hand
(``optimize.accelerate``) it runs alone too, eagerly. torchao's recommended inductor settings are not
applied (``set_inductor_config=False``): they change process-wide state
(``torch.set_float32_matmul_precision``) that removal could not take back and that would change the
untouched pipeline.

Removal is exact: every layer gets its own weight and bias Parameters back (kept while applied, so
the untouched pipeline's CUDA graphs, which read them at their addresses, stay valid) and loses what
torchao added (``extra_repr``) and the casts.

torchao is an optional dependency (``pip install 'optimize-sd[gpu]'``); without it the lever is
unavailable and said so once before a run.

Example:
    >>> from optimize.levers.precision import Precision, LEVER
    >>> LEVER.label(Precision(mode="fp8"))
    'fp8'
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .base import GPU_ONLY, Applied, Choice, Context, Device, InvalidConfig, Lever, Undo, param

MODES = ("int8", "fp8")
FP8_CAPABILITY = (8, 9)


def torchao_missing() -> str | None:
    """Why torchao cannot be used here, or None (asks the import system, imports nothing)."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'optimize-sd[gpu]')"
    return None


def fp8_runs(device: Device | None) -> bool:
    """Whether float8 matmuls run on ``device`` (True where it is not known yet)."""
    if device is None:
        return True
    return device.type == "cuda" and device.capability is not None and device.capability >= FP8_CAPABILITY


def _modes_here(ctx: Context) -> tuple[str, ...]:
    return MODES if fp8_runs(ctx.device) else ("int8",)


@dataclass(frozen=True)
class Precision:
    """The precision's settings."""

    mode: str = param("int8", valid=Choice(MODES), search=Choice(_modes_here),
                      doc="int8: int8 weights and per-token int8 activations; fp8: float8 weights and activations "
                          "scaled per row (compute capability 8.9 or later)")


class _Applied(Applied):
    def __init__(self):
        self.undo = Undo()

    def remove(self) -> None:
        self.undo.run()


class PrecisionLever(Lever):
    name, short, Params = "precision", "prec", Precision
    # uncompiled, the quantized layers cost more than they save, and in a graph mode torchao's int8
    # cannot be captured at all (docs/benchmarks.md): searched only with a compiled UNet
    requires = "compile"

    def unavailable(self, ctx: Context) -> str | None:
        missing = torchao_missing()
        if missing is not None:
            return missing
        if ctx.device is not None and ctx.device.type not in ("cuda", "cpu"):
            return f"torchao's dynamic quantization runs on CUDA or the CPU, not {ctx.device.type}"
        return None

    def check(self, params: Precision, ctx: Context) -> None:
        if params.mode == "fp8" and not fp8_runs(ctx.device):
            where = ctx.device.type if ctx.device.capability is None else f"compute capability {ctx.device.capability}"
            raise InvalidConfig(f"precision.mode fp8 needs an NVIDIA GPU of compute capability "
                                f"{'.'.join(map(str, FP8_CAPABILITY))} or later (this device: {where}); use int8")

    def no_gain(self, ctx: Context) -> str | None:
        if ctx.device is not None and ctx.device.type != "cuda":
            return GPU_ONLY
        return None

    def label(self, params: Precision) -> str:
        return params.mode

    def apply(self, pipe, params: Precision, others) -> _Applied:
        applied = _Applied()
        try:
            for linear in token_linears(pipe.unet):
                _quantize_one(linear, params.mode, applied.undo)
        except BaseException:
            applied.remove()
            raise
        return applied


def token_linears(unet) -> list:
    """The ``Linear`` layers inside the UNet's transformer blocks, each once."""
    import torch
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    seen, out = set(), []
    for block in unet.modules():
        if isinstance(block, Transformer2DModel):
            for m in block.modules():
                if isinstance(m, torch.nn.Linear) and id(m) not in seen:
                    seen.add(id(m))
                    out.append(m)
    return out


def _quantize_one(linear, mode: str, undo: Undo) -> None:
    import torch

    own = {name: linear._parameters.get(name) for name in ("weight", "bias")}
    had_repr = "extra_repr" in linear.__dict__
    undo.add(lambda: _restore(linear, own, had_repr))
    dtype = own["weight"].dtype
    if mode == "fp8" and dtype != torch.bfloat16:
        # per-row float8 takes bf16 weights: this layer computes in bf16 between two casts
        for name, p in own.items():
            if p is not None:
                linear._parameters[name] = torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
        for handle in (linear.register_forward_pre_hook(lambda m, args: (args[0].to(torch.bfloat16), *args[1:])),
                       linear.register_forward_hook(lambda m, args, out: out.to(dtype))):
            undo.add(handle.remove)
    quantize(linear, mode)


def _restore(linear, own: dict, had_repr: bool) -> None:
    for name, p in own.items():
        linear._parameters[name] = p
    if not had_repr:
        linear.__dict__.pop("extra_repr", None)


def quantize(linear, mode: str) -> None:
    """torchao's quantization of one ``Linear`` layer, in place (its weight becomes a torchao tensor)."""
    import warnings

    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Int8DynamicActivationInt8WeightConfig, PerRow, quantize_)

    with warnings.catch_warnings():
        # the int8 config fills in a deprecated layout by itself even where version 2 never uses it
        warnings.filterwarnings("ignore", message="Deprecation: PlainLayout", category=UserWarning)
        # version 2 is torchao's Int8Tensor (the older AffineQuantizedTensor is deprecated; in the
        # CPU measurement above the call took 1.12 s with it, 1.91 s with the older one)
        config = (Int8DynamicActivationInt8WeightConfig(version=2, set_inductor_config=False) if mode == "int8"
                  else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    quantize_(linear, config)


LEVER = PrecisionLever()
