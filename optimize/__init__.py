"""optimize-sd: find the fastest training-free acceleration settings for a Stable Diffusion pipeline.

The public Python API applies a found configuration to your own pipeline::

    import optimize
    with optimize.accelerate(pipe, {"deepcache": True, "deepcache.cache_interval": 3}) as fast:
        images = fast("a red fox in the snow", num_inference_steps=50).images

The names load on first use, so that ``import optimize.cli`` (the command line) starts light and a
Ctrl-C while the libraries load is the command's to answer.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_FROM = {**dict.fromkeys(("Accelerated", "Config", "DeepCache", "InvalidConfig", "Layout", "Precision", "Schedule",
                          "TGate", "ToMe", "Vae", "accelerate"), ".levers"),
         "testbed": ".runtime"}  # `from optimize import testbed`: the offline model, as docs/testbed.md shows

__all__ = sorted(_FROM)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .levers import (Accelerated, Config, DeepCache, InvalidConfig, Layout, Precision, Schedule, TGate, ToMe,
                         Vae, accelerate)
    from .runtime import testbed


def __getattr__(name: str):
    if name not in _FROM:
        raise AttributeError(f"module 'optimize' has no attribute {name!r}")
    value = getattr(import_module(_FROM[name], __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__():
    return sorted(set(globals()) | set(_FROM))
