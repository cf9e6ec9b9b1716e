"""optimize.runtime.compiling: one compiled function per process and settings, whose graphs a later
call finds again; the seconds torch spent compiling; where its on-disk caches go."""

from __future__ import annotations

import torch

from optimize.runtime.compiling import compile_seconds, compiled, graphs_of, signature


def _step(x, scale: float):
    return torch.relu(x) * scale


def test_one_compiled_function_per_settings_whose_graphs_are_found_again():
    fast = compiled(_step, "eager")
    assert compiled(_step, "eager") is fast and compiled(_step, "aot_eager") is not fast
    before, seconds = graphs_of(_step), compile_seconds()
    x = torch.randn(3)
    torch.testing.assert_close(fast(x, 2.0), _step(x, 2.0))
    assert graphs_of(_step) == before + 1 and compile_seconds() > seconds
    fast(torch.randn(3), 2.0)
    compiled(_step, "eager")(torch.randn(3), 2.0)  # handed out again: the same graph
    assert graphs_of(_step) == before + 1
    fast(torch.randn(4), 2.0)  # static shapes: another shape is a graph of its own
    assert graphs_of(_step) == before + 2


def test_a_call_signature_names_shapes_and_other_leaves():
    a = signature((torch.zeros(2, 3),), {"t": torch.tensor(1.0), "return_dict": False})
    assert a == signature((torch.ones(2, 3),), {"t": torch.tensor(5.0), "return_dict": False})
    assert a != signature((torch.zeros(1, 3),), {"t": torch.tensor(1.0), "return_dict": False})
    assert a != signature((torch.zeros(2, 3),), {"t": torch.tensor(1.0), "return_dict": True})

