"""optimize-sd: find the fastest training-free acceleration settings for a Stable Diffusion pipeline.

The public Python API applies a found configuration to your own pipeline::

    import optimize
    with optimize.accelerate(pipe, {"deepcache": True, "deepcache.cache_interval": 3}) as fast:
        images = fast("a red fox in the snow", num_inference_steps=50).images
"""

from .levers import (Accelerated, Config, DeepCache, InvalidConfig, Layout, Precision, Schedule, TGate, ToMe, Vae,
                     accelerate)
from .runtime import testbed  # `from optimize import testbed`: the offline model, as docs/testbed.md shows

__all__ = ["Accelerated", "Config", "DeepCache", "InvalidConfig", "Layout", "Precision", "Schedule", "TGate", "ToMe",
           "Vae", "accelerate", "testbed"]
__version__ = "0.1.0"
