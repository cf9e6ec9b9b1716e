"""The levers, in the order they are applied and searched: the only list of them.

The order matters. A lever sees the context the levers before it leave (the schedule's steps are the
steps DeepCache and T-GATE run), is applied after them (T-GATE drives the DeepCache helper applied
before it), and its call hook runs inside theirs (T-GATE replaces the call with its own loop, the
last lever that changes the call). The layout comes before the precision: the QKV projections are
fused from the full-precision weights and the fused layer is quantized (torchao's tensors cannot be
concatenated, and one quantized matmul beats three).
Compile comes last of all: it compiles the UNet's forward with whatever the levers before it put
inside (the layout's fused projections, the precision's quantized layers).
"""

from __future__ import annotations

from . import compile, deepcache, layout, precision, schedule, tgate, tome, vae
from .base import Lever

LEVERS: tuple[Lever, ...] = (schedule.LEVER, deepcache.LEVER, tome.LEVER, tgate.LEVER, layout.LEVER, precision.LEVER,
                             vae.LEVER, compile.LEVER)
BY_NAME: dict[str, Lever] = {lever.name: lever for lever in LEVERS}
METHODS: tuple[str, ...] = tuple(BY_NAME)
