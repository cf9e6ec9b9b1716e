"""A real model to optimize offline: a small text-to-image pipeline and CLIP scorer trained on a
synthetic world of captioned shapes (see :mod:`optimize.runtime.testbed.world` and docs/testbed.md).

Public API::

    >>> from optimize import testbed
    >>> testbed.captions("heldout")[:1]              # doctest: +SKIP
    ['a large pink diamond at the top on a black background']
    >>> testbed.render(testbed.captions("heldout")[0]).size
    (64, 64)
    >>> testbed.pipeline_dir()                       # a StableDiffusionPipeline directory  # doctest: +SKIP
    >>> from optimize.measure.metrics import testbed_scorer
    >>> testbed_scorer()                             # a ClipScorer on the trained open_clip model  # doctest: +SKIP

Both models were trained by ``benchmarks/train_testbed.py``; the weights ship inside the package
(``optimize/testbed/weights/``): ``pipeline/`` (diffusers, fp16 safetensors) and ``clip/`` (an open_clip
model config ``testbed-clip.json`` and its fp16 safetensors weights).
"""

from __future__ import annotations

import os

from .world import Scene, captions, colour_of, parse, render, scenes

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
CLIP_NAME = "testbed-clip"
CLIP_PRETRAINED = "testbed"  # what --clip-pretrained (and a study's fingerprint) says for the shipped weights


def pipeline_dir() -> str:
    """The shipped diffusers ``StableDiffusionPipeline`` directory (load it with ``from_pretrained``)."""
    path = os.path.join(WEIGHTS, "pipeline")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"the testbed pipeline is missing: {path} (train it with benchmarks/train_testbed.py)")
    return path


def clip_dir() -> str:
    """The folder with the open_clip model config (``testbed-clip.json``) and weights."""
    return os.path.join(WEIGHTS, "clip")


def clip_weights() -> str:
    path = os.path.join(clip_dir(), f"{CLIP_NAME}.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the testbed CLIP weights are missing: {path}")
    return path


def register_clip_config() -> None:
    """Register ``testbed-clip`` with open_clip (``open_clip.add_model_config``); idempotent."""
    import open_clip

    if CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(clip_dir())


__all__ = ["Scene", "captions", "clip_dir", "clip_weights", "colour_of", "parse", "pipeline_dir", "render",
           "register_clip_config", "scenes"]
