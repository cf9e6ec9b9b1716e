"""Measure one configuration: generate the prompts' images, time every call, score the images.

Protocol: apply the configuration and make one untimed warm-up call. Then ``repeats`` *paired rounds*
on the first batch: one timed call of the untouched pipeline, one timed call with the configuration
applied. A speed gate may stop there; a configuration that goes on to be scored gets more rounds, up
to ``scored_repeats`` in all, since its speedup is the one that can become the result. Then one pass
over all prompts with the configuration applied, whose images are scored.

The scoring pass may run several prompts per call (``score_batch``), each prompt with its own
generator seeded ``seed + its index``, so every image keeps the seed it has at batch 1 while the timed
calls stay at the study's batch size. Per-image work is the same, the calls fewer: at batch 1 the
scoring pass was most of a scored trial (one call per prompt). A short last batch is its own call
shape (in a graph mode one more capture per step kind, a few UNet calls' time), not padded: padding
would generate up to ``score_batch - 1`` images for nothing; prompt counts that are multiples of
the scoring batch (the defaults) have one shape. ``score_batch=None`` scores as studies made before
it did: in calls of the study's batch size, one generator per call (``seed + call index``).
Every call is bracketed by a device synchronize, the garbage collector is paused during it (as
``timeit`` does), and the configuration is removed afterwards, whatever happens.

Every timed call is also cut into *segments* at each UNet call: what comes before the first step,
each denoising step, and the last step with the decode. On a GPU the cuts are CUDA events, so a
segment is the time on the device's timeline, idle gaps included. A configuration's time is its
*floor*: the sum over segments of the fastest time seen for that segment across the calls. At batch
1 the pipeline is launch-bound, so any stall of the host shows up as device time; stalls only ever
add time and hit a few steps of a call, not all of them. The floor gets to the undisturbed time from
calls that were each disturbed somewhere, where the fastest whole call needs one call disturbed
nowhere. Speedup = baseline floor / configured floor of the same rounds: the pairing cancels drift
between minutes (calls seconds apart share it), equal counts on both sides keep the two floors
equally biased. ``spread`` = interquartile range / median of the whole configured calls shows how
disturbed they were (docs/benchmarks.md, P1).

Every device gets paired rounds: on a loaded CPU a baseline timed in another minute reads the load
as acceleration (the untouched pipeline measured 0.35x that way), while calls seconds apart share it.
On a CPU a side's time is the geometric mean of its whole calls instead of the floor
(:attr:`Evaluator.statistic`), so the speedup is the mean paired log ratio, the centre of its interval.
Without repeats (only the study's own baseline, ``paired=False``) the scoring pass's calls are the
timing.

In a graph mode (``exec="graphs"`` or ``"compile"``, :mod:`optimize.runtime.graphs`) both sides replay CUDA
graphs. A configuration is applied once per measurement, so its graphs are captured once (in the
warm-up call); the paired baseline calls route the UNet to the untouched pipeline's own graphs, which
were captured before anything was applied: a replay runs none of the configuration's Python, so the
baseline calls compute exactly what the untouched pipeline computes.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np

from ..levers import Accelerated, Config
from ..runtime.graphs import PipelineGraphs, StepGraphs
from ..study.record import PART_APPLY, PART_CAPTURE, PART_CLIP, PART_GENERATION, PART_TIMING


def default_rounds(device: str, exec_mode: str) -> tuple[int, int]:
    """The defaults of ``--repeats`` and ``--scored-repeats``: (paired rounds before the speed gate,
    paired rounds in all for a scored configuration). On a GPU eagerly 3 and 10: the host's launch
    jitter is in every call, and 10 rounds hold P1 (the same configuration twice in one run) within 1%.
    Replayed from graphs a call's spread is 0.1-2% and 3 rounds already hold it within about 1%, so a
    scored configuration gets 5 (docs/benchmarks.md, P1). On a CPU (eager) 3 and 6: on a loaded 2-core
    machine 6 rounds held the same configuration measured twice within 4-8% and every interval
    around its other measurement (and around 1 for the baseline against itself); 3 rounds tell a slow
    configuration from a fast one, 2 were off by up to 20% (docs/benchmarks.md, "CPU timing")."""
    if not str(device).startswith("cuda"):
        return 3, 6
    return (3, 10) if exec_mode == "eager" else (3, 5)


SCORE_PIXELS = 8 * 512 * 512  # pixels per scoring call on a GPU by default: SD1.5 at batch 8
CPU_SCORE_BATCH = 8  # the CPU's default: the testbed's fastest (docs/benchmarks.md, "Scored trial")


def default_score_batch(device: str, height: int, width: int) -> int:
    """The default of ``--score-batch``. On a GPU 8 images at 512x512 and fewer for larger images
    (a power of two, at most :data:`SCORE_PIXELS` pixels per call: SD2.1 at 768 gets 2, SDXL at 1024 2),
    since a graph mode keeps one set of activations per step kind and shape, and the VAE decodes the
    whole batch at once. On a CPU :data:`CPU_SCORE_BATCH`."""
    if not str(device).startswith("cuda"):
        return CPU_SCORE_BATCH
    batch = 8
    while batch > 1 and batch * height * width > SCORE_PIXELS:
        batch //= 2
    return batch


def pin_cpu_threads(device: str) -> None:
    """On a CPU, time with one intra-op thread. On a shared machine a second thread waits at every
    operator's barrier for a core another process holds: at load 7 on 2 cores a 20-step call of the
    testbed took 36-56 s with torch's 2 threads and 1.2-3.0 s with one (docs/benchmarks.md, "CPU timing").
    Both sides of every paired round run alike, so speedups stay the acceleration's own."""
    if not str(device).startswith("cuda"):
        import torch

        torch.set_num_threads(1)


@dataclass
class Timing:
    best: float  # seconds per image, the statistic speedups use: the floor (GPU) or the geometric mean (CPU)
    median: float
    spread: float
    samples: list[float] = field(repr=False)  # seconds per image of each whole call
    segments: list[list[float]] | None = field(default=None, repr=False)  # per call, per segment

    @property
    def fastest(self) -> float:
        """The fastest whole call, per image."""
        return min(self.samples)

    @classmethod
    def from_samples(cls, samples: list[float], segments: list[list[float]] | None = None,
                     statistic: str = "floor") -> "Timing":
        q1, med, q3 = np.percentile(samples, [25, 50, 75])
        spread = float((q3 - q1) / med) if med > 0 else 0.0
        if statistic == "geomean":  # of equal paired counts: base / configured = the mean paired log ratio
            return cls(float(np.exp(np.mean(np.log(samples)))), float(med), spread, [float(s) for s in samples],
                       segments)
        best = floor(segments) if segments else None
        return cls(min(samples) if best is None else best, float(med), spread, [float(s) for s in samples],
                   segments)


def floor(segments: list[list[float]]) -> float | None:
    """Sum over segment positions of the fastest time at that position; None when the calls were
    not cut alike (then only whole calls compare)."""
    if not segments or len({len(s) for s in segments}) != 1 or not segments[0]:
        return None
    return float(np.asarray(segments, dtype=float).min(axis=0).sum())


class _StepClock:
    """Cuts one pipeline call at every UNet call: a forward pre-hook on the UNet, CUDA events on a GPU
    (the device's timeline, so the cuts cost no synchronize), ``perf_counter`` elsewhere. Every
    method here calls the UNet once per step through ``unet(...)``, so hooks see each step."""

    def __init__(self, pipe):
        import torch

        self.unet = pipe.unet
        self.cuda = pipe.device.type == "cuda"
        self._event = (lambda: torch.cuda.Event(enable_timing=True)) if self.cuda else None
        self.marks: list = []

    def mark(self, *_) -> None:
        if self.cuda:
            event = self._event()
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    @contextmanager
    def running(self):
        self.marks = []
        handle = self.unet.register_forward_pre_hook(self.mark)
        try:
            self.mark()
            yield self
            self.mark()
        finally:
            handle.remove()

    def segments(self) -> list[float]:
        """Seconds per segment; call after the device is synchronized."""
        m = self.marks
        if self.cuda:
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(m, m[1:])]
        return [b - a for a, b in zip(m, m[1:])]


class _Series:
    """Timed calls of one configuration, per image."""

    def __init__(self):
        self.samples: list[float] = []
        self.segments: list[list[float] | None] = []

    def add(self, seconds: float, segments: list[float] | None, images: int) -> None:
        self.samples.append(seconds / images)
        self.segments.append([x / images for x in segments] if segments else None)

    def extend(self, other: "_Series") -> None:
        self.samples += other.samples
        self.segments += other.segments

    def timing(self, statistic: str = "floor") -> Timing | None:
        if not self.samples:
            return None
        cut = None if any(s is None for s in self.segments) else self.segments
        return Timing.from_samples(self.samples, cut, statistic)


@dataclass
class Measurement:
    config: Config
    timing: Timing
    scores: np.ndarray
    images: list = field(repr=False)
    reference: Timing | None = None  # the baseline calls paired with the timed ones, if any
    parts: dict[str, float] = field(default_factory=dict)  # wall seconds per part (Evaluator.parts)

    @property
    def speedup(self) -> float | None:
        """Paired speedup (baseline floor / configured floor), None without rounds."""
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
    """Measures configurations on one loaded pipeline with one scorer and one prompt list.

    ``score_batch``: prompts per call of the scoring pass, each with its own seed (module docstring;
    None: the study's batch size, one generator per call, as studies made before it scored).

    :attr:`parts` holds the wall seconds of the last measurement's parts, also after it raised (the
    speed gate): ``timing`` (from the start to the scoring pass: applying, warm-up, paired rounds),
    ``generation`` (the scoring pass), ``clip`` (scoring its images), ``apply`` (applying the
    configuration, within the other parts), ``capture`` in a graph mode (the CUDA graphs captured,
    within ``timing`` and ``generation``), and whatever a lever reports of its own work: an applied
    lever's ``seconds`` mapping (e.g. ``{"compile": 41.0}``), summed over the applications.
    """

    def __init__(self, pipe, scorer, prompts: list[str], settings: GenerationSettings, repeats: int = 1,
                 progress: bool = False, scored_repeats: int = 0, exec: str = "eager", graph_backend=None,
                 score_batch: int | None = None):
        self.pipe, self.scorer, self.prompts, self.settings = pipe, scorer, prompts, settings
        if score_batch is not None and (isinstance(score_batch, bool) or not isinstance(score_batch, int)
                                        or score_batch < 1):
            raise ValueError(f"score_batch must be a positive integer, got {score_batch!r}")
        self.score_batch = score_batch
        self.parts: dict[str, float] = {}
        self.repeats = repeats
        self.scored_repeats = scored_repeats
        self.progress = progress
        self.exec = exec
        self.graph_backend = graph_backend
        self._baseline_warm = False
        self._clock: _StepClock | None = None
        self._held = None  # graph modes: the configuration applied for the whole measurement
        self.captures = 0  # graph modes: graphs captured and seconds spent capturing, all configurations
        self.capture_seconds = 0.0
        self.baseline_graphs = None if exec == "eager" else StepGraphs(
            pipe.unet, backend=graph_backend,
            capture_allowed=lambda: ("the baseline's graphs are captured on the untouched pipeline only"
                                     if getattr(pipe, "_optimize_sd_applied", False) else None))
        # the text encoders' graphs and the host schedule: one set for the baseline and every configuration
        self.pipeline_graphs = None if exec == "eager" else PipelineGraphs(pipe, backend=graph_backend)

    @property
    def statistic(self) -> str:
        """What a side's time is (:class:`Timing`): the per-step floor on a GPU, where a stall of the
        launch-bound host only adds time to some steps; the geometric mean of the whole calls on a CPU,
        where other processes take the cores for whole time slices and a floor of a few rounds swung by
        up to 30% between two measurements of the same configuration, while the ratio of geometric means
        (the mean paired log ratio, the centre of the speedup's interval) held within 2-8%
        (docs/benchmarks.md, "CPU timing")."""
        return "floor" if self.pipe.device.type == "cuda" else "geomean"

    def _batches(self):
        bs = self.settings.batch_size
        return [self.prompts[i : i + bs] for i in range(0, len(self.prompts), bs)]

    def scoring_calls(self) -> list[tuple[list[str], int | list[int]]]:
        """The scoring pass's calls: (prompts, seed offsets): one offset per prompt (its index), or
        without ``score_batch`` one per call (the call's index)."""
        if self.score_batch is None:
            return [(batch, index) for index, batch in enumerate(self._batches())]
        n = self.score_batch
        return [(self.prompts[i : i + n], list(range(i, min(i + n, len(self.prompts)))))
                for i in range(0, len(self.prompts), n)]

    def _sync(self) -> None:
        import torch

        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize(self.pipe.device)

    def _call(self, run, batch: list[str], offset: int | list[int]):
        """One timed call: (images, seconds, seconds per segment). ``offset``: the generator's seed
        offset, or one per prompt (a generator each)."""
        import torch

        s = self.settings
        # a CPU generator gives the same initial noise on every device
        if isinstance(offset, int):
            generator = torch.Generator("cpu").manual_seed(s.seed + offset)
        else:
            generator = [torch.Generator("cpu").manual_seed(s.seed + o) for o in offset]
        if self._clock is None:
            self._clock = _StepClock(self.pipe)
        collect = gc.isenabled()
        gc.disable()  # a collection mid-call would stall the launch-bound loop: time the pipeline, not gc
        try:
            self._sync()
            start = time.perf_counter()
            with self._clock.running():
                images = run(
                    prompt=batch, num_inference_steps=s.steps, guidance_scale=s.guidance, height=s.height,
                    width=s.width, output_type="np", generator=generator,
                ).images
            self._sync()
            seconds = time.perf_counter() - start
        finally:
            if collect:
                gc.enable()
        return images, seconds, self._clock.segments()

    def _configured(self, config: Config):
        if self._held is not None:
            return nullcontext(self._held)
        if self.baseline_graphs is not None and not config.methods:
            return self._untouched()
        return self._applied(config)

    @contextmanager
    def _applied(self, config: Config):
        """``config`` applied, its apply time and what its levers report of their own work in :attr:`parts`."""
        run = Accelerated(self.pipe, config, seed=self.settings.seed, exec=self.exec,
                          graph_backend=self.graph_backend, pipeline_graphs=self.pipeline_graphs)
        start = time.perf_counter()
        with run:
            self._add(PART_APPLY, time.perf_counter() - start)
            try:
                yield run
            finally:  # read before the removal forgets the applied levers
                for applied in (run.applied or {}).values():
                    for name, seconds in (getattr(applied, "seconds", None) or {}).items():
                        self._add(str(name), float(seconds))

    def _add(self, part: str, seconds: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds

    def _capture_seconds(self) -> float:
        """Seconds spent capturing graphs so far: the baseline's, the text encoders' and every
        configuration's (added when it is removed)."""
        total = self.capture_seconds
        for graphs in (self.baseline_graphs, self.pipeline_graphs):
            if graphs is not None:
                total += graphs.stats.capture_seconds
        return total

    @contextmanager
    def _untouched(self):
        """The untouched pipeline; in a graph mode with the baseline's graphs routed in (module
        docstring), also while a configuration is held."""
        graphs = self.baseline_graphs
        if graphs is None:
            yield self.pipe
            return
        with self.pipeline_graphs.installed():
            if graphs.is_installed:
                yield self.pipe
                return
            with graphs.installed():
                yield self.pipe

    @contextmanager
    def _holding(self, config: Config):
        """Graph modes keep ``config`` applied for the whole measurement; eager applies it per call
        (the baseline calls need the untouched pipeline there)."""
        if self.exec == "eager" or self._held is not None:
            yield
            return
        self._warm_baseline()  # before anything is applied: the baseline's graphs are captured untouched
        with self._configured(config) as run:
            self._held = run
            try:
                yield
            finally:
                self._held = None
                stats = getattr(getattr(run, "graphs", None), "stats", None)
                if stats is not None:
                    self.captures += stats.captures
                    self.capture_seconds += stats.capture_seconds

    def _warm_baseline(self) -> None:
        if not self._baseline_warm:
            with self._untouched() as pipe:
                self._call(pipe, self._batches()[0], 0)
            self._baseline_warm = True

    def time_eager(self, calls: int) -> Timing:
        """Time the untouched pipeline eagerly, whatever this evaluator's mode: a graph-mode study's
        "vs eager" reference."""
        mode, graphs = self.exec, self.baseline_graphs
        self.exec, self.baseline_graphs = "eager", None
        try:
            return self._solo(Config(), max(1, calls)).timing(self.statistic)
        finally:
            self.exec, self.baseline_graphs = mode, graphs

    def close(self) -> None:
        """Free the baseline's graphs and the text encoders'."""
        if self.baseline_graphs is not None:
            self.baseline_graphs.close()
        if self.pipeline_graphs is not None:
            stats = self.pipeline_graphs.stats
            self.captures += stats.captures
            self.capture_seconds += stats.capture_seconds
            self.pipeline_graphs.close()

    def _solo(self, config: Config, calls: int) -> "_Series":
        """Apply ``config``, one untimed warm-up call (first-call costs: allocator, kernels), then
        ``calls`` timed calls on the first batch."""
        first = self._batches()[0]
        series = _Series()
        with self._configured(config) as run:
            self._call(run, first, 0)
            for _ in range(calls):
                series.add(*self._call(run, first, 0)[1:], len(first))
        return series

    def _rounds(self, config: Config, paired: bool) -> tuple["_Series", "_Series"]:
        timed, base = self._solo(config, 0 if paired else self.repeats), _Series()
        if paired:
            self._warm_baseline()
            self._paired(config, self.repeats, timed, base)
        return timed, base

    def _paired(self, config: Config, rounds: int, timed: "_Series", base: "_Series") -> None:
        first = self._batches()[0]
        for _ in range(rounds):
            # eager: apply + remove cost ~10 ms, outside the timed calls; a re-applied configuration
            # needs no second warm-up (its kernels and allocator blocks are already there)
            with self._untouched() as pipe:
                base.add(*self._call(pipe, first, 0)[1:], len(first))
            with self._configured(config) as run:
                timed.add(*self._call(run, first, 0)[1:], len(first))

    def time(self, config: Config) -> tuple[Timing, Timing]:
        """The warm-up and the paired rounds of :meth:`measure`, without the scoring pass:
        (configured timing, baseline timing); speedup = ``baseline.best / configured.best``."""
        config.validate(self.pipe, self.settings.steps, self.settings.guidance)
        with self._holding(config):
            timed, base = self._rounds(config, paired=True)
        if not base.samples:
            raise ValueError("paired timing needs repeats >= 1")
        return timed.timing(self.statistic), base.timing(self.statistic)

    def measure(self, config: Config, gate=None, paired: bool = True) -> Measurement:
        """Time and score ``config`` (module docstring: the protocol).

        ``paired=False`` times the configuration alone (the study's baseline itself). ``gate``, if
        given, is called with the configured and the baseline timings of the rounds before the
        scoring pass and may raise to skip it (the configuration is removed either way).
        """
        self.parts = {}
        config.validate(self.pipe, self.settings.steps, self.settings.guidance)
        start = time.perf_counter()
        captured = self._capture_seconds()
        try:
            with self._holding(config):
                m = self._measure(config, gate, paired, start)
        finally:
            if self.exec != "eager":  # the held configuration's graphs are counted once it is removed
                self.parts[PART_CAPTURE] = self._capture_seconds() - captured
        m.parts = dict(self.parts)
        return m

    def _measure(self, config: Config, gate, paired: bool, start: float) -> Measurement:
        from tqdm.auto import tqdm

        full = self.settings.batch_size
        images: list[np.ndarray] = []
        timed, base = self._rounds(config, paired and self.repeats > 0)
        reference = base.timing(self.statistic)
        self.parts[PART_TIMING] = time.perf_counter() - start
        if gate is not None and timed.samples:
            gate(timed.timing(self.statistic), reference)
        if reference is not None and self.scored_repeats > self.repeats:
            self._paired(config, self.scored_repeats - self.repeats, timed, base)
            reference = base.timing(self.statistic)
            self.parts[PART_TIMING] = time.perf_counter() - start
        generating = time.perf_counter()
        scoring = _Series()
        with self._configured(config) as run, tqdm(total=len(self.prompts), desc=config.label(), leave=False,
                                                   disable=not self.progress, unit="prompt") as bar:
            for batch, offset in self.scoring_calls():
                out, seconds, segments = self._call(run, batch, offset)
                if len(batch) == full:  # a call of another size has another per-image cost
                    scoring.add(seconds, segments, len(batch))
                images.extend(out)
                bar.update(len(batch))
        if reference is None:  # the paired rounds alone give the speedup: equal counts on both sides, no bias
            timed.extend(scoring)
        if not timed.samples:
            timed.add(seconds, segments, len(batch))
        stacked = np.stack(images)
        if not np.isfinite(stacked).all():
            raise FloatingPointError(f"{config.label()}: generated images contain NaN or Inf")
        pil = self.pipe.numpy_to_pil(stacked)
        self.parts[PART_GENERATION] = time.perf_counter() - generating
        scoring_start = time.perf_counter()
        scores = self.scorer.score(pil, self.prompts)
        self.parts[PART_CLIP] = time.perf_counter() - scoring_start
        return Measurement(config, timed.timing(self.statistic), scores, pil, reference)
