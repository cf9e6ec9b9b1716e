"""VAE: decode in fp16 where an SDXL pipeline would upcast its fp16 VAE to fp32 (``force_upcast``).

SDXL's pipelines read ``vae.config.force_upcast``: with it, every call converts the VAE's weights to
fp32, decodes in fp32 and converts them back, since the stock SDXL VAE's activations overflow fp16
(its decode then gives NaN: black images). A VAE whose activations stay within fp16's range (the
fp16-fix VAE, fine-tuned to scale its internal activations down, or a fine-tune built on it) decodes
in fp16 without the two conversions; this lever lets the search try that on a pipeline whose VAE
config asks for the upcast.

It acts per call only: the VAE's config (the same object) is back after every call, so removal has
nothing left to undo, and in a graph mode the untouched pipeline's calls paired with the
configuration's decode as they always did. A decode that gives a non-finite value fails the call
with an error naming the overflow (the trial is recorded as failed) instead of returning black
images. Searchable only where the upcast happens (:attr:`Context.vae_upcast`): an SD pipeline, an
fp32 one (any CPU run) or a VAE whose config already says ``force_upcast: false`` decodes without it.

Example:
    >>> from optimize.levers.vae import Vae, LEVER
    >>> LEVER.label(Vae())
    'vae16'
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from .base import Applied, Choice, Context, InvalidConfig, Lever, param


@dataclass(frozen=True)
class Vae:
    """The VAE's settings."""

    fp16_decode: bool = param(True, valid=Choice((True,)),
                              doc="decode in fp16 instead of the fp32 upcast the VAE's config asks for")


class _Applied(Applied):
    def __init__(self, pipe):
        self.pipe = pipe

    def remove(self) -> None:
        pass  # the config is swapped during a call only (calling)

    @contextmanager
    def calling(self, kwargs: dict):
        from diffusers.configuration_utils import FrozenDict

        vae = self.pipe.vae
        own = vae.__dict__["_internal_dict"]
        vae.__dict__["_internal_dict"] = FrozenDict({**own, "force_upcast": False})
        handle = vae.decoder.register_forward_hook(_finite)
        try:
            yield
        finally:
            handle.remove()
            vae.__dict__["_internal_dict"] = own


def _finite(module, args, output) -> None:
    import torch

    if not bool(torch.isfinite(output).all()):
        raise FloatingPointError("vae.fp16_decode: the VAE's fp16 decode gave NaN or inf: its activations overflow "
                                 "fp16 (the stock SDXL VAE does; the fp16-fix VAE does not)")


class VaeLever(Lever):
    name, short, Params = "vae", "vae", Vae

    def searchable(self, ctx: Context) -> bool:
        return ctx.vae_upcast is not False

    def check(self, params: Vae, ctx: Context) -> None:
        if ctx.vae_upcast is False:
            raise InvalidConfig("vae.fp16_decode does nothing here: this pipeline decodes without the fp32 upcast "
                                "(only SDXL's pipelines upcast, an fp16 VAE whose config says force_upcast)")

    def label(self, params: Vae) -> str:
        return "vae16"

    def apply(self, pipe, params: Vae, others) -> _Applied:
        return _Applied(pipe)


LEVER = VaeLever()
