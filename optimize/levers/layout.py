"""Layout: how the UNet's tensors are laid out and which kernels run them, not what they compute.

* ``channels_last``: the convolution weights in channels-last memory format, so the convolutions
  (and the activations they produce) run NHWC, the layout the GPU's tensor-core kernels prefer.
* ``fused_qkv``: diffusers' ``fuse_qkv_projections()``: one matmul for query, key and value of each
  self-attention (key and value of each cross-attention) instead of three (two).
* ``sdpa``: the attention kernel, through ``torch.nn.attention.sdpa_kernel`` around each UNet call
  (the text encoders and the VAE keep theirs). ``default`` leaves the choice to PyTorch.

Tolerance against the untouched UNet: none of these changes the arithmetic, only its order, so the
output is equal up to rounding, not bit for bit. Measured on the CPU (UNet output of one step,
max |a - b| / max |a|): channels_last 5.7e-7 (the testbed) and 2.7e-6 (SD1.5's architecture, random
weights), both fp32; the ``math`` kernel instead of the default 2.9e-7 and 9.4e-7; ``fused_qkv``
0, bit-identical (the testbed in fp32 and bf16, SD1.5's architecture in fp32: the CPU's matmul
computes each output column alike whether the weights are concatenated or not). On a GPU the fused
matmul and the NHWC convolutions are other kernels, tiled differently: expect fp16 rounding-level
differences there, which a study bounds like any lever's.

Removal is exact: the very weight tensors, processors and modules are put back (the convolution
weights' original tensors stay alive while applied, so the untouched pipeline's CUDA graphs, which
read them at their addresses, stay valid). diffusers' ``unfuse_qkv_projections()``
alone would not do: it leaves the fused modules and ``fused_projections = True`` behind.

Example:
    >>> from optimize.levers.layout import Layout, LEVER
    >>> LEVER.label(Layout(channels_last=True, fused_qkv=True, sdpa="flash"))
    'cl+qkv+flash'
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import GPU_ONLY, Applied, Choice, Context, InvalidConfig, Lever, Snapshot, Undo, param

SDPA = ("default", "flash", "efficient", "cudnn", "math")
_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
_FUSED = ("to_qkv", "to_kv", "to_added_qkv", "processor")  # what fuse_qkv_projections adds or swaps per Attention


def sdpa_here(ctx: Context) -> tuple[str, ...]:
    """The attention kernels that run on ``ctx``'s device and dtype (all of them where unknown)."""
    device = ctx.device
    if device is None:
        return SDPA
    if device.type != "cuda":
        return ("default", "flash", "math")  # PyTorch's CPU kernels: flash is what the default picks
    # flash and cuDNN attention need fp16/bf16 and an Ampere or later GPU; efficient and math run anywhere
    half = ctx.dtype in (None, "float16", "bfloat16")
    ampere = device.capability is None or device.capability >= (8, 0)
    return tuple(o for o in SDPA if o in ("default", "efficient", "math") or (half and ampere))


@dataclass(frozen=True)
class Layout:
    """The layout's settings."""

    channels_last: bool = param(True, valid=Choice((False, True)),
                                doc="the UNet's convolution weights (and so its activations) in channels-last format")
    fused_qkv: bool = param(True, valid=Choice((False, True)),
                            doc="one matmul for each attention's query, key and value (diffusers' fuse_qkv_projections)")
    sdpa: str = param("default", valid=Choice(sdpa_here),
                      doc="the attention kernel of the UNet's calls: default (PyTorch's pick), flash, efficient, "
                          "cudnn or math, where it runs")


class _Applied(Applied):
    def __init__(self):
        self.undo = Undo()

    def remove(self) -> None:
        self.undo.run()


class LayoutLever(Lever):
    name, short, Params = "layout", "layout", Layout

    def no_gain(self, ctx: Context) -> str | None:
        if ctx.device is not None and ctx.device.type != "cuda":
            return GPU_ONLY
        return None

    def label(self, params: Layout) -> str:
        parts = ["cl"] * params.channels_last + ["qkv"] * params.fused_qkv
        parts += [params.sdpa] if params.sdpa != "default" else []
        return "+".join(parts) or "layout"

    def check(self, params: Layout, ctx: Context) -> None:
        if params == Layout(channels_last=False, fused_qkv=False, sdpa="default"):
            # the untouched UNet under another name: a trial of it would time noise
            raise InvalidConfig("layout.channels_last, layout.fused_qkv and layout.sdpa all off change nothing: "
                                "switch layout off instead")

    def apply(self, pipe, params: Layout, others) -> _Applied:
        applied = _Applied()
        try:
            unet = pipe.unet
            if params.channels_last:
                _channels_last(unet, applied.undo)
            if params.fused_qkv:
                _fuse_qkv(unet, applied.undo)
            if params.sdpa != "default":
                _sdpa_around(unet, params.sdpa, applied.undo)
        except BaseException:
            applied.remove()
            raise
        return applied


def _channels_last(unet, undo: Undo) -> None:
    import torch

    for p in unet.parameters():
        if p.dim() == 4:  # convolution weights
            own = p.data
            p.data = own.contiguous(memory_format=torch.channels_last)
            undo.add(lambda p=p, own=own: setattr(p, "data", own))


def _fuse_qkv(unet, undo: Undo) -> None:
    from diffusers.models.attention_processor import Attention

    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    snapshot = Snapshot([unet, *attentions], ("original_attn_processors", "processor", "fused_projections"))
    children = [(m, {n: m._modules.get(n) for n in _FUSED if n in m._modules}) for m in attentions]

    def unfuse():
        for module, had in children:
            for n in _FUSED:
                if n in had:
                    module._modules[n] = had[n]
                else:
                    module._modules.pop(n, None)
        snapshot.restore()

    undo.add(unfuse)
    unet.fuse_qkv_projections()


def _sdpa_around(unet, name: str, undo: Undo) -> None:
    """The kernel for the UNet's calls only: entered by a pre-hook, left by a hook that runs even when
    the call raises (a kernel that cannot run these inputs raises at the first attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _BACKENDS[name])
    entered = []

    def enter(module, args):
        context = sdpa_kernel(backend)
        context.__enter__()
        entered.append(context)

    def leave(module, args, output):
        if entered:
            entered.pop().__exit__(None, None, None)

    for handle in (unet.register_forward_pre_hook(enter), unet.register_forward_hook(leave, always_call=True)):
        undo.add(handle.remove)


LEVER = LayoutLever()
