#!/usr/bin/env python
"""A picture of what a study traded on the trained testbed: for a few of its held-out captions, the
ground truth, the baseline, the study's pick and its most lossy infeasible trial, same seeds.

    optimize-sd run --pipe tiny --target-speedup 1.5 --n-trials 8          # the README demo
    python benchmarks/testbed_grid.py --storage sqlite:///studies/optimize-sd.db --out docs/images/testbed-demo.png

Rows are labelled with the configuration, its speedup and CLIP score loss as the study measured them.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import optimize  # noqa: E402
from optimize import testbed  # noqa: E402
from optimize.runtime.pipelines import load_pipeline, resolve_pipe  # noqa: E402
from optimize.app.report import measured_trials  # noqa: E402
from optimize.study.record import SCORE_LOSS, SPEEDUP, Goal, goal_of, is_feasible, open_study, study_result  # noqa: E402


def rows_of(study, goal: Goal):
    """(label, params) of the baseline, the pick and the most lossy infeasible trial."""
    best, _ = study_result(study, goal)
    bad = [t for t in measured_trials(study) if not is_feasible(t)]
    worst = max(bad, key=lambda t: t.user_attrs.get(SCORE_LOSS, 0.0), default=None)
    rows = [("baseline", None)]
    for tag, t in (("pick", best), ("infeasible", worst)):
        if t is not None:
            a = t.user_attrs
            rows.append((f"{tag} #{t.number} {a.get('config', '')}: {a[SPEEDUP]:.2f}x, loss {a.get(SCORE_LOSS, 0):+.3f}",
                         t.params))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", default="sqlite:///studies/optimize-sd.db")
    ap.add_argument("--study", default=None)
    ap.add_argument("--captions", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="docs/images/testbed-demo.png")
    args = ap.parse_args()
    study = open_study(args.storage, args.study)
    goal = goal_of(study)
    pipe = load_pipeline(resolve_pipe("tiny"), "ddim", "cpu", "fp32")
    caps = testbed.captions("heldout")[: args.captions]
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=7.5, output_type="np")
    strips, labels = [np.concatenate([np.asarray(testbed.render(c)) for c in caps], axis=1)], ["ground truth"]
    for label, params in rows_of(study, goal):
        gen = torch.Generator("cpu").manual_seed(42)
        if params is None:
            images = pipe(caps, generator=gen, **kwargs).images
        else:
            with optimize.accelerate(pipe, params) as fast:
                images = fast(caps, generator=gen, **kwargs).images
        strips.append(np.concatenate(list((np.asarray(images) * 255).round().astype(np.uint8)), axis=1))
        labels.append(label)
    save(strips, labels, caps, args.out)
    print(f"wrote {args.out}: {', '.join(labels)}")
    return 0


def save(strips, labels, caps, path: str) -> None:
    from PIL import Image, ImageDraw

    band, w = 14, strips[0].shape[1]
    canvas = Image.new("RGB", (w, sum(s.shape[0] + band for s in strips)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for strip, label in zip(strips, labels):
        draw.text((2, y + 1), label, fill="black")
        canvas.paste(Image.fromarray(strip), (0, y + band))
        y += band + strip.shape[0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


if __name__ == "__main__":
    sys.exit(main())
