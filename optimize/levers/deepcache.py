"""DeepCache: recompute the deep UNet blocks only every ``cache_interval`` steps and reuse their output
in between (``DeepCacheSDHelper``); ``cache_branch_id`` picks the skip branch (higher = less cached).

Library pitfalls handled here: enabling a helper twice recurses (so :class:`Accelerated` refuses a
second apply); ``disable()`` leaves instance-level ``forward``\\ s bound to the originals (removed
from a snapshot); the cached block outputs and the step counter carry over from the previous call
(reset before every call); the block wrappers ask the step counter whether to skip, so a compiled
UNet would trace one graph per step: the step's part is decided before the UNet's forward
(``step_kind``) and the wrappers read only that (:func:`frozen_rule`).

Example:
    >>> from optimize.levers.deepcache import DeepCache, LEVER
    >>> LEVER.label(DeepCache(cache_interval=5, cache_branch_id=1))
    'dc(5,b1)'
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.graphs import dict_slot
from .base import Applied, Context, Int, Lever, Snapshot, param


@dataclass(frozen=True)
class DeepCache:
    """DeepCache's settings."""

    cache_interval: int = param(3, valid=Int(1), search=Int(2, 10),
                                doc="a full UNet step every N steps, the shallow branch alone in between")
    cache_branch_id: int = param(
        0, valid=Int(0, lambda c: c.max_branch_id), search=Int(0, lambda c: None if c.max_branch_id is None else min(5, c.max_branch_id)),
        doc="the skip branch whose deep output is cached: 0 caches the most (fastest), higher ids less")


class _Applied(Applied):
    def __init__(self, helper, snapshot: Snapshot):
        self.helper = helper  # T-GATE's DeepCache-aware loop drives this same helper (optimize.levers.tgate)
        self._snapshot = snapshot
        self.partial = False  # the coming step's part, frozen by step_kind for the block wrappers

    def remove(self) -> None:
        try:
            if "unet_forward" in getattr(self.helper, "function_dict", {}):
                self.helper.disable()
        finally:
            self._snapshot.restore()

    def reset(self, seed: int) -> None:
        self.helper.cached_output = {}
        self.helper.cur_timestep = 0
        self.helper.start_timestep = None

    def step_kind(self):
        # the helper's own schedule on its step counter (its UNet wrapper set it for this step); like
        # its block wrappers it fixes start_timestep on a call's first step, which a replay (no Python
        # inside) would otherwise never do
        self.partial = type(self.helper).is_skip_step(self.helper, 0, 0, "mid")
        return "partial" if self.partial else "full"

    def slots(self) -> list:
        helper = self.helper
        return [dict_slot(lambda: helper.cached_output, lambda v: setattr(helper, "cached_output", v))]


def frozen_rule(applied: _Applied, params: dict):
    """The helper's ``is_skip_step`` for its block wrappers: DeepCache's own rule (uniform skip mode,
    the one this lever sets) with the step's part read from the flag ``step_kind`` froze, never from
    the step counter. Read from the counter, a compiled UNet guards on it and traces one graph per
    step (docs/benchmarks.md: 10 graphs for 10 steps); read from the flag, one per kind."""
    block, layer = params["cache_block_id"], params["cache_layer_id"]

    def is_skip_step(block_i, layer_i, blocktype="down"):
        if not applied.partial:
            return False
        if block_i > block or blocktype == "mid":
            return True
        if block_i < block:
            return False
        return layer_i >= layer if blocktype == "down" else layer_i > layer

    return is_skip_step


class DeepCacheLever(Lever):
    name, short, Params = "deepcache", "dc", DeepCache

    def label(self, params: DeepCache) -> str:
        return f"dc({params.cache_interval},b{params.cache_branch_id})"

    def warm_starts(self, ctx: Context) -> list[DeepCache]:
        # On the search-efficiency benchmark (docs/benchmarks.md) enqueuing N=3 and N=5 on branch 0 cut
        # the simulated GPU time to reach the best configuration by 25-84%.
        return [DeepCache(3, 0), DeepCache(5, 0)]

    def apply(self, pipe, params: DeepCache, others) -> _Applied:
        from DeepCache import DeepCacheSDHelper

        applied = _Applied(DeepCacheSDHelper(pipe=pipe), Snapshot(pipe.unet.modules(), ("forward",)))
        try:
            applied.helper.set_params(cache_interval=params.cache_interval, cache_branch_id=params.cache_branch_id)
            applied.helper.is_skip_step = frozen_rule(applied, applied.helper.params)
            applied.helper.enable()
        except BaseException:
            applied.remove()
            raise
        return applied


LEVER = DeepCacheLever()
