"""optimize.runtime.compiling: one compiled function per process and settings, whose graphs a later
call finds again; the seconds torch spent compiling; where its on-disk caches go."""

from __future__ import annotations

import os

import torch

from optimize.runtime.compiling import (compile_seconds, compiled, frames_compiled, graphs_of, signature,
                                       use_cache_dir)
from optimize.study.artifacts import compile_cache_for


def _step(x, scale: float):
    return torch.relu(x) * scale


def test_one_compiled_function_per_settings_whose_graphs_are_found_again():
    fast = compiled(_step, "eager")
    assert compiled(_step, "eager") is fast and compiled(_step, "aot_eager") is not fast
    before, seconds, frames = graphs_of(_step), compile_seconds(), frames_compiled()
    x = torch.randn(3)
    torch.testing.assert_close(fast(x, 2.0), _step(x, 2.0))
    assert graphs_of(_step) == before + 1 and compile_seconds() > seconds and frames_compiled() == frames + 1
    fast(torch.randn(3), 2.0)
    compiled(_step, "eager")(torch.randn(3), 2.0)  # handed out again: the same graph
    assert graphs_of(_step) == before + 1 and frames_compiled() == frames + 1
    fast(torch.randn(4), 2.0)  # static shapes: another shape is a graph of its own
    assert graphs_of(_step) == before + 2 and frames_compiled() == frames + 2


def test_a_call_signature_names_shapes_and_other_leaves():
    a = signature((torch.zeros(2, 3),), {"t": torch.tensor(1.0), "return_dict": False})
    assert a == signature((torch.ones(2, 3),), {"t": torch.tensor(5.0), "return_dict": False})
    assert a != signature((torch.zeros(1, 3),), {"t": torch.tensor(1.0), "return_dict": False})
    assert a != signature((torch.zeros(2, 3),), {"t": torch.tensor(1.0), "return_dict": True})


def test_the_cache_directory_is_the_users_if_set_else_the_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert use_cache_dir(str(tmp_path / "c")) == str(tmp_path / "c") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert use_cache_dir(str(tmp_path / "other")) == str(tmp_path / "c")
    assert not (tmp_path / "c").exists()  # made by the first compile, not before
    assert compile_cache_for("sqlite:///studies/optimize-sd.db") == "studies/optimize-sd-compile-cache"
    assert compile_cache_for("postgresql://u@h/db") == os.path.join("studies", "compile-cache")
