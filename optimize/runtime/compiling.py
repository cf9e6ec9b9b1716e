"""``torch.compile`` as a run uses it: one compiled function per process and settings, its on-disk
caches in a directory the run chooses, and the seconds it spent compiling.

Dynamo keeps what it compiled on the *code object* of the function it traced, one graph per set of
guards (what the trace assumed: shapes, the values of flags it read). A function compiled once here
and called again by a later configuration reuses every graph whose guards still hold, so a study
compiles each distinct traced graph once per process. Across processes, inductor's FX graph cache
and AOTAutograd's cache (on by default) keep the generated code under ``TORCHINDUCTOR_CACHE_DIR``,
Triton's kernels beside it: a known graph is read back instead of generated again (the SD1.5 UNet on an
H200: 7.3 s in a fresh process instead of 61 s; Dynamo still traces it).

Example:
    >>> compile_seconds() >= 0.0
    True
"""

from __future__ import annotations

import os
import sys
from typing import Callable

_COMPILED: dict[tuple, Callable] = {}


def compiled(function: Callable, backend: str = "inductor", mode: str | None = None) -> Callable:
    """``torch.compile(function)`` with static shapes, made once per process for each ``(function,
    backend, mode)`` and handed out again after, so its graphs are found again (module docstring)."""
    key = (function, backend, mode)
    if key not in _COMPILED:
        import torch

        # static shapes: a new shape (T-GATE's halved batch, a short last batch) is a graph of its own,
        # as it is a CUDA graph of its own, instead of one dynamic graph slower for every shape
        options = {"mode": mode} if backend == "inductor" and mode else {}
        _COMPILED[key] = torch.compile(function, backend=backend, dynamic=False, **options)
    return _COMPILED[key]


def graphs_of(function: Callable) -> int:
    """How many graphs Dynamo keeps for ``function``'s code (what its recompile limit counts)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(getattr(function, "__code__", function)))


def frames_compiled() -> int:
    """How many frames Dynamo has compiled in this process (each recompile of a function counts), every
    function's included: what a call compiled is the difference across it."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import compilation_time_metrics

    return len(compilation_time_metrics.get("_compile.compile_inner", ()))


def compile_seconds() -> float:
    """Seconds ``torch.compile`` has spent compiling in this process, as torch accounts them: every
    frame's Dynamo trace and its backend's compile (inductor's code generation and kernel builds)."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled, and importing Dynamo takes a second
        return 0.0
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))


def use_cache_dir(directory: str) -> str:
    """Keep inductor's and AOTAutograd's on-disk caches (and Triton's kernels) in ``directory`` unless
    ``TORCHINDUCTOR_CACHE_DIR`` is set already; call before anything compiles. Returns the one in effect."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(directory))
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def signature(args: tuple, kwargs: dict) -> tuple:
    """What of a call's arguments decides which graph Dynamo runs, beside the levers' state: the
    tensors' shapes, dtypes and devices, and the other leaves."""
    import torch
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten((args, kwargs))
    return str(spec), tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x)
                            for x in leaves)
