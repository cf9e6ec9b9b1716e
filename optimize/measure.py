"""Measure one configuration: generate the prompts' images, time every call, score the images.

Protocol: apply the configuration, make one untimed warm-up call, then ``repeats`` timed calls on the
first batch and one timed pass over all prompts (whose images are scored). Every call is bracketed by
a device synchronize. The configuration is removed afterwards, whatever happens.

Time per image = the *fastest* full-batch call / batch size. On a shared GPU at batch 1 the pipeline
is launch-bound and host hiccups only ever add time: measured twice in one run on an H200, speedups
from the minimum agreed within 0.3-0.6%, from the median within 1.3-3.5% (docs/benchmarks.md, P1).
``spread`` = interquartile range / median shows how disturbed the calls were.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .accelerators import Config, accelerate


@dataclass
class Timing:
    best: float  # seconds per image of the fastest call: the statistic speedups are computed from
    median: float
    spread: float
    samples: list[float] = field(repr=False)

    @classmethod
    def from_samples(cls, samples: list[float]) -> "Timing":
        q1, med, q3 = np.percentile(samples, [25, 50, 75])
        spread = float((q3 - q1) / med) if med > 0 else 0.0
        return cls(float(min(samples)), float(med), spread, [float(s) for s in samples])


@dataclass
class Measurement:
    config: Config
    timing: Timing
    scores: np.ndarray
    images: list = field(repr=False)

    @property
    def clip_score(self) -> float:
        return float(np.mean(self.scores))


@dataclass
class GenerationSettings:
    steps: int
    guidance: float
    height: int
    width: int
    batch_size: int = 1
    seed: int = 42


class Evaluator:
    """Measures configurations on one loaded pipeline with one scorer and one prompt list."""

    def __init__(self, pipe, scorer, prompts: list[str], settings: GenerationSettings, repeats: int = 1,
                 progress: bool = False):
        self.pipe, self.scorer, self.prompts, self.settings = pipe, scorer, prompts, settings
        self.repeats = repeats
        self.progress = progress

    def _batches(self):
        bs = self.settings.batch_size
        return [self.prompts[i : i + bs] for i in range(0, len(self.prompts), bs)]

    def _sync(self) -> None:
        import torch

        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize(self.pipe.device)

    def _call(self, run, batch: list[str], index: int):
        import torch

        s = self.settings
        self._sync()
        start = time.perf_counter()
        images = run(
            prompt=batch, num_inference_steps=s.steps, guidance_scale=s.guidance, height=s.height,
            width=s.width, output_type="np",
            # a CPU generator gives the same initial noise on every device
            generator=torch.Generator("cpu").manual_seed(s.seed + index),
        ).images
        self._sync()
        return images, time.perf_counter() - start

    def time_only(self, config: Config, calls: int) -> Timing:
        """Time ``config`` without scoring: warm-up, then ``calls`` timed calls on the first batch."""
        batch = self._batches()[0]
        with accelerate(self.pipe, config, seed=self.settings.seed) as run:
            self._call(run, batch, 0)
            return Timing.from_samples([self._call(run, batch, 0)[1] / len(batch) for _ in range(max(1, calls))])

    def measure(self, config: Config, gate=None) -> Measurement:
        """Time and score ``config``. ``gate``, if given, sees the timing of the repeats before the
        scoring pass and may raise to skip it (the configuration is removed either way)."""
        from tqdm.auto import tqdm

        config.validate(self.pipe, self.settings.steps, self.settings.guidance)
        batches = self._batches()
        full = self.settings.batch_size
        samples: list[float] = []
        images: list[np.ndarray] = []
        with accelerate(self.pipe, config, seed=self.settings.seed) as run:
            self._call(run, batches[0], 0)  # warm-up: first-call costs (allocator, kernels) not timed
            for _ in range(self.repeats):
                _, seconds = self._call(run, batches[0], 0)
                samples.append(seconds / len(batches[0]))
            if gate is not None and samples:
                gate(Timing.from_samples(samples))
            with tqdm(total=len(self.prompts), desc=config.label(), leave=False, disable=not self.progress,
                      unit="prompt") as bar:
                for index, batch in enumerate(batches):
                    out, seconds = self._call(run, batch, index)
                    if len(batch) == full:  # a short last batch has another per-image cost
                        samples.append(seconds / len(batch))
                    images.extend(out)
                    bar.update(len(batch))
        if not samples:
            samples = [seconds / len(batches[-1])]
        stacked = np.stack(images)
        if not np.isfinite(stacked).all():
            raise FloatingPointError(f"{config.label()}: generated images contain NaN or Inf")
        pil = self.pipe.numpy_to_pil(stacked)
        scores = self.scorer.score(pil, self.prompts)
        return Measurement(config, Timing.from_samples(samples), scores, pil)
