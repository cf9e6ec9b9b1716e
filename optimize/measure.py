"""Measure one configuration: generate the prompts' images, time every call, score the images.

Protocol: apply the configuration and make one untimed warm-up call. Then ``repeats`` *paired rounds*
on the first batch: one timed call of the untouched pipeline, one timed call with the configuration
applied. Then one pass over all prompts with the configuration applied, whose images are scored.
Every call is bracketed by a device synchronize; the configuration is removed afterwards, whatever
happens.

Speedup = fastest baseline call / fastest configured call of the same rounds. The pairing is what
makes a speedup repeatable: a GPU drifts by 2-5% between minutes, so a configuration timed in one
window against a baseline timed in another inherits that drift (2.2-3.0% apart when measured twice on
an H200), while calls seconds apart share it. The minimum, because at batch 1 the pipeline is
launch-bound and host hiccups only ever add time. ``spread`` = interquartile range / median of the
configured calls shows how disturbed they were (docs/benchmarks.md, P1).

Without repeats (the CPU default) there are no rounds: the scoring pass's calls are the timing, and
the caller supplies the baseline time.
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
    reference: Timing | None = None  # the baseline calls paired with the timed ones, if any

    @property
    def speedup(self) -> float | None:
        """Paired speedup (fastest baseline call / fastest configured call), None without rounds."""
        return self.reference.best / self.timing.best if self.reference else None

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
        self._baseline_warm = False

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

    def measure(self, config: Config, gate=None, paired: bool = True) -> Measurement:
        """Time and score ``config`` (module docstring: the protocol).

        ``paired=False`` times the configuration alone (the study's baseline itself). ``gate``, if
        given, is called with the configured and the baseline timings of the rounds before the
        scoring pass and may raise to skip it (the configuration is removed either way).
        """
        from tqdm.auto import tqdm

        config.validate(self.pipe, self.settings.steps, self.settings.guidance)
        batches = self._batches()
        first = batches[0]
        full = self.settings.batch_size
        samples: list[float] = []
        base: list[float] = []
        images: list[np.ndarray] = []
        paired = paired and self.repeats > 0

        def configured():
            return accelerate(self.pipe, config, seed=self.settings.seed)

        with configured() as run:
            self._call(run, first, 0)  # warm-up: first-call costs (allocator, kernels) not timed
            if not paired:
                samples += [self._call(run, first, 0)[1] / len(first) for _ in range(self.repeats)]
        if paired:
            if not self._baseline_warm:
                self._call(self.pipe, first, 0)
                self._baseline_warm = True
            for _ in range(self.repeats):
                # apply + remove cost ~10 ms, outside the timed calls; a re-applied configuration
                # needs no second warm-up (its kernels and allocator blocks are already there)
                base.append(self._call(self.pipe, first, 0)[1] / len(first))
                with configured() as run:
                    samples.append(self._call(run, first, 0)[1] / len(first))
        reference = Timing.from_samples(base) if base else None
        if gate is not None and samples:
            gate(Timing.from_samples(samples), reference)
        pass_samples: list[float] = []
        with configured() as run, tqdm(total=len(self.prompts), desc=config.label(), leave=False,
                                       disable=not self.progress, unit="prompt") as bar:
            for index, batch in enumerate(batches):
                out, seconds = self._call(run, batch, index)
                if len(batch) == full:  # a short last batch has another per-image cost
                    pass_samples.append(seconds / len(batch))
                images.extend(out)
                bar.update(len(batch))
        if not paired:  # the paired rounds alone give the speedup: equal counts on both sides, no bias
            samples += pass_samples
        if not samples:
            samples = [seconds / len(batches[-1])]
        stacked = np.stack(images)
        if not np.isfinite(stacked).all():
            raise FloatingPointError(f"{config.label()}: generated images contain NaN or Inf")
        pil = self.pipe.numpy_to_pil(stacked)
        scores = self.scorer.score(pil, self.prompts)
        return Measurement(config, Timing.from_samples(samples), scores, pil, reference)
