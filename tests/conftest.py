"""Shared test fixtures and helpers.

Sections:
  * process set-up: offline hub, torch threads
  * helpers: ``generate`` (deterministic numpy images)
  * fixtures: ``tiny_pipe``, ``tiny_xl_pipe``, ``tiny_xl_fp16_pipe`` (built once per session)

Tests that change a shared pipeline must leave it as they found it (``optimize.accelerate`` restores
it on exit); tests that need to break a pipeline build their own with ``make_pipe``.
"""

from __future__ import annotations

import os
import tempfile

# --- process set-up -----------------------------------------------------------------------------
# No network here: make every hub client fail fast instead of retrying. Set before diffusers /
# transformers / datasets are imported, since they read these variables at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# a run keeps compiled code beside its study unless this is set: keep the tests' in one place instead
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"optimize-sd-tests-inductor-{os.getuid()}"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from optimize.runtime.pipelines import load_pipeline, resolve_pipe  # noqa: E402

# The tiny models are dominated by per-op overhead: on a small (often shared) CPU one thread is much
# faster than several competing ones. Override with OPTIMIZE_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("OPTIMIZE_TEST_THREADS", "1")))


# --- helpers ------------------------------------------------------------------------------------
def make_pipe(name: str = "tiny", scheduler: str = "ddim", dtype: str = "fp32"):
    """A fresh tiny pipeline (``tiny`` or ``tiny-xl``) on CPU, in fp32 unless told; same weights every time."""
    return load_pipeline(resolve_pipe(name), scheduler, "cpu", dtype)


def generate(fn, prompts, steps: int, seed: int = 0, **kwargs) -> np.ndarray:
    """Run a pipeline or an ``Accelerated`` callable deterministically; images as a numpy array."""
    out = fn(
        prompts, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np", **kwargs,
    )
    return np.asarray(out.images)


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_pipe():
    return make_pipe("tiny")


@pytest.fixture(scope="session")
def tiny_xl_pipe():
    return make_pipe("tiny-xl")


@pytest.fixture(scope="session")
def tiny_xl_fp16_pipe():
    """tiny-xl in fp16 (on the CPU too): an SDXL pipeline whose VAE is upcast to fp32 for the decode."""
    return make_pipe("tiny-xl", dtype="fp16")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """The shared 4-trial target-mode run (made once per session, see helpers.target_run)."""
    from helpers import target_run

    return target_run(tmp_path_factory)


@pytest.fixture(scope="module")
def maxrun(tmp_path_factory):
    """The shared 4-trial max-mode run (see helpers.max_run)."""
    from helpers import max_run

    return max_run(tmp_path_factory)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a pipeline or a CLIP model is an error in these tests: they must fail before that."""
    from optimize.runtime import pipelines
    from optimize.app import runner

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for name in ("load_pipeline", "build_tiny_xl_pipeline", "build_random_pipeline"):
        monkeypatch.setattr(pipelines, name, refuse)
    monkeypatch.setattr(runner, "ClipScorer", refuse)
