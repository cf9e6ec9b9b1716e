"""Training-free accelerations ("levers"), one module each, behind one protocol (:mod:`.base`).

* :mod:`.schedule`: another solver and fewer steps than the reference;
* :mod:`.deepcache`: reuse the deep UNet blocks' output between full steps;
* :mod:`.tome`: merge redundant tokens before attention;
* :mod:`.tgate`: cache cross-attention after a gate step;
* :mod:`.layout`: channels-last convolutions, fused QKV projections, the attention kernel;
* :mod:`.precision`: torchao's int8 or fp8 dynamic quantization of the UNet's token-wise layers;
* :mod:`.vae`: SDXL's VAE decoded in fp16 instead of its fp32 upcast.
* :mod:`.compile`: ``torch.compile`` of the whole UNet, one graph per step kind.

:data:`LEVERS` is the registry; :class:`Config` says which are on; :func:`accelerate` applies one to a
loaded pipeline and removes it exactly. Adding a lever is one module, one line in :mod:`.registry`
and one contract-test subclass (``tests/levers/contract.py``).
"""

from .apply import Accelerated, accelerate
from .base import Applied, Choice, Context, Device, Float, Int, InvalidConfig, Lever, param
from .compile import Compile
from .config import Config
from .deepcache import DeepCache
from .layout import Layout
from .precision import Precision
from .registry import BY_NAME, LEVERS, METHODS
from .schedule import Schedule
from .tgate import TGate
from .tome import ToMe
from .vae import Vae

__all__ = ["Accelerated", "Applied", "BY_NAME", "Choice", "Compile", "Config", "Context", "DeepCache", "Device", "Float",
           "Int", "InvalidConfig", "LEVERS", "Layout", "Lever", "METHODS", "Precision", "Schedule", "TGate", "ToMe", "Vae",
           "accelerate", "param"]
