"""ToMe (``tomesd``): merge redundant tokens before attention, on the blocks down to ``max_downsample``.

Library pitfalls handled here: with its default ``use_rand`` tomesd draws from a generator forked
from the global RNG at the first call and advanced across calls, so two calls differ: it is reseeded
in place before every call (in place, since the graphs of a graph mode hold that very generator);
``remove_patch`` leaves ``_tome_info`` and ``use_ada_layer_norm*`` attributes behind (removed from a
snapshot).

Example:
    >>> from optimize.levers.tome import ToMe, LEVER
    >>> LEVER.label(ToMe(ratio=0.5, max_downsample=2))
    'tome(0.5,md2)'
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Applied, Choice, Context, Float, InvalidConfig, Lever, Snapshot, param

DOWNSAMPLES = (1, 2, 4, 8)


@dataclass(frozen=True)
class ToMe:
    """ToMe's settings."""

    # tomesd merges at most 75% of tokens with its default 2x2 stride: ratios above that act as 0.75
    ratio: float = param(0.5, valid=Float(0, 1, open=True), search=Float(0.1, 0.9, step=0.05),
                         doc="the share of tokens merged")
    # SDXL has no attention at full resolution, so max_downsample=1 is a no-op there
    max_downsample: int = param(1, valid=Choice(DOWNSAMPLES),
                                search=Choice(lambda c: DOWNSAMPLES[1:] if c.xl else DOWNSAMPLES),
                                doc="merge in the blocks down to this downsampling factor (1: the full-resolution ones only)")


class _Applied(Applied):
    def __init__(self, pipe, snapshot: Snapshot):
        self.pipe, self._snapshot = pipe, snapshot
        self._patched = False

    def remove(self) -> None:
        try:
            if self._patched:
                import tomesd

                self._patched = False
                tomesd.remove_patch(self.pipe)
        finally:
            self._snapshot.restore()

    def reset(self, seed: int) -> None:
        import torch

        args = self.pipe.unet._tome_info["args"]
        if args["generator"] is None or args["generator"].device != self.pipe.unet.device:
            args["generator"] = torch.Generator(device=self.pipe.unet.device)
        args["generator"].manual_seed(seed)

    def generators(self) -> list:
        generator = self.pipe.unet._tome_info["args"]["generator"]
        return [] if generator is None else [generator]


class ToMeLever(Lever):
    name, short, Params = "tome", "tome", ToMe

    def label(self, params: ToMe) -> str:
        return f"tome({params.ratio:g},md{params.max_downsample})"

    def check(self, params: ToMe, ctx: Context) -> None:
        if ctx.xl and params.max_downsample == 1:
            raise InvalidConfig("tome.max_downsample=1 does nothing on SDXL (no attention at full resolution): use 2, 4 or 8")

    def apply(self, pipe, params: ToMe, others) -> _Applied:
        import tomesd

        applied = _Applied(pipe, Snapshot(pipe.unet.modules(), ("_tome_info", "use_ada_layer_norm",
                                                                 "use_ada_layer_norm_zero")))
        try:
            applied._patched = True
            tomesd.apply_patch(pipe, ratio=float(params.ratio), max_downsample=params.max_downsample)
        except BaseException:
            applied.remove()
            raise
        return applied


LEVER = ToMeLever()
