"""The search: the space the levers declare (:mod:`.space`) and the objective a trial runs
(:mod:`.objective`: measure, compare with the stored baseline, record, the speed gate).

Example:
    >>> from optimize.levers import Context
    >>> from optimize.search import warm_start_params
    >>> [p.get("deepcache.cache_interval") for p in warm_start_params(("deepcache",), Context(steps=50))]
    [3, 5]
"""

from .objective import Objective, SpeedGate
from .space import SearchSpace, make_sampler, warm_start_params

__all__ = ["Objective", "SearchSpace", "SpeedGate", "make_sampler", "warm_start_params"]
