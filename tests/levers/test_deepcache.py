"""The deepcache lever keeps the lever contract (tests/levers/contract.py); its block wrappers skip
exactly where DeepCache's own rule skips, reading the step's part from a flag instead of the counter."""

import itertools
from types import SimpleNamespace

from contract import LeverContract

from optimize.levers import BY_NAME
from optimize.levers.deepcache import frozen_rule


class TestDeepCacheContract(LeverContract):
    lever = BY_NAME["deepcache"]


def test_the_frozen_rule_skips_where_deepcaches_own_rule_skips():
    """Every branch and interval, every step of a call, every position a block wrapper asks about
    (down, mid, up; block 0-3, layer 0-2), against ``DeepCacheSDHelper.is_skip_step`` on its counter."""
    from DeepCache import DeepCacheSDHelper

    positions = [*itertools.product(range(4), range(3), ("down", "up")), (0, 0, "mid")]
    for branch, interval in itertools.product(range(12), (1, 2, 3, 5)):
        helper = DeepCacheSDHelper()
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.start_timestep = None
        applied = SimpleNamespace(partial=False)
        rule = frozen_rule(applied, helper.params)
        for step in range(2, 14):  # a call whose first step is not 0 (img2img's strength)
            helper.cur_timestep = step
            applied.partial = helper.is_skip_step(0, 0, "mid")  # what step_kind freezes
            for block, layer, kind in positions:
                assert rule(block, layer, kind) == helper.is_skip_step(block, layer, kind), (branch, interval, step)
