"""The levers, in the order they are applied and searched: the only list of them.

The order matters. A lever sees the context the levers before it leave (the schedule's steps are the
steps DeepCache and T-GATE run), is applied after them (T-GATE drives the DeepCache helper applied
before it), and its call hook runs inside theirs (T-GATE replaces the call with its own loop, so it
comes last of those with a call hook). Compile comes last of all: it compiles the UNet's forward with
whatever the levers before it put inside.
"""

from __future__ import annotations

from . import compile, deepcache, schedule, tgate, tome
from .base import Lever

LEVERS: tuple[Lever, ...] = (schedule.LEVER, deepcache.LEVER, tome.LEVER, tgate.LEVER, compile.LEVER)
BY_NAME: dict[str, Lever] = {lever.name: lever for lever in LEVERS}
METHODS: tuple[str, ...] = tuple(BY_NAME)
