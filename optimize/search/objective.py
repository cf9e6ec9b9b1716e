"""The objective a trial runs: suggest a configuration from the search space, measure it against the
stored baseline, record speedup, losses, time, spread, intervals and what the measurement cost (its
wall time and the part torch spent compiling) as user attrs, and the constraints
where optuna-dashboard shows them and Optuna 5's TPE reads them (infeasible trials rank below feasible
ones). The speed gate skips scoring a configuration too slow to matter. What each trial's time went on
is recorded too (``parts``, ``wall_s``), however it ends. The goals and the stored keys are
:mod:`optimize.study.record`'s.
"""

from __future__ import annotations

import math
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..levers import Config, InvalidConfig
from ..measure.metrics import score_loss
from ..measure.uncertainty import intervals
from ..runtime.compiling import compile_seconds
from ..study.baseline import Baseline
from ..study.record import (BASELINE_SPREAD, BASELINE_TIME, CLIP_SCORE, COMPILE_SECONDS, CONFIG, ERROR, INTERVALS,
                            PART_FIDELITY, PARTS, PER_PROMPT, REUSED_FROM, ROUNDS, SCORE_LOSS, SKIPPED, SPEEDUP,
                            SPEEDUP_EAGER, SPREAD, TIME_MEDIAN, TIME_PER_IMAGE, WALL, WORKER, Goal, best_feasible,
                            record_constraints,
                            record_per_prompt)
from .space import SearchSpace


class SpeedGate(Exception):
    """A configuration whose timed repeats show it cannot help the goal: its scoring is skipped."""

    def __init__(self, attrs: dict[str, Any], reason: str):
        super().__init__(reason)
        self.attrs = attrs


def _timing_attrs(timing, base: float, paired=None, eager: float | None = None) -> dict[str, Any]:
    """A trial's timing attrs from its configured timing and the baseline time it is divided by
    (``paired``: the baseline calls of its rounds, if any; ``eager``: a graph mode's eager baseline)."""
    attrs = {SPEEDUP: base / timing.best, TIME_PER_IMAGE: timing.best, TIME_MEDIAN: timing.median,
             SPREAD: timing.spread, BASELINE_TIME: base}
    if eager is not None:
        attrs[SPEEDUP_EAGER] = eager / timing.best
    if paired is not None:
        attrs[ROUNDS] = len(paired.samples)
    return attrs


class Objective:
    """Optuna objective: suggest, measure, compare with the baseline, record.

    Every measurement pairs its calls with baseline calls made seconds apart (:mod:`optimize.measure.evaluator`)
    and its speedup is the ratio of those, on every device. A speedup divided by a baseline time from
    another minute (or another run) reads the machine's load as acceleration: on a loaded 2-core CPU
    that gave the untouched pipeline 0.35x and a pick 10.02x that measured 3.94x held out
    (docs/benchmarks.md, "CPU timing"). So trials of different runs compare: each carries its own
    baseline. The stored baseline keeps the scores and the images.
    """

    def __init__(self, evaluator, baseline: Baseline, goal: Goal, space: SearchSpace,
                 speed_gate: bool = True, gate_margin: float = 0.02, fidelity=None, eager_time: float | None = None):
        self.evaluator, self.baseline, self.goal, self.space = evaluator, baseline, goal, space
        self.fidelity = fidelity  # a metrics.FidelityScorer holding the baseline images, or None
        self.eager_time = eager_time  # graph modes: the eager baseline's time, for "vs eager"
        self.last_images = None
        self.last_per_prompt = None  # the last measurement's per-prompt scores (PER_PROMPT)
        self.parts: dict[str, float] = {}  # the last trial's PARTS
        self.speed_gate, self.gate_margin = speed_gate, gate_margin

    def _same_config(self, study: optuna.Study, params: dict[str, Any]) -> FrozenTrial | None:
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.params == params and SPEEDUP in t.user_attrs:
                return t
        return None

    def _gate(self, study: optuna.Study):
        """The speed gate: skip scoring a configuration that is too slow to matter, judged from the
        paired rounds timed before the scoring pass. Target mode: more
        than ``gate_margin`` below the target. Max mode: more than ``gate_margin`` below the best
        feasible speedup so far (it cannot become the best, whatever its loss). On the search-efficiency
        simulation this cut GPU time by 55-68% for the same trials. Pareto mode has no gate: a slow
        configuration may still be on the front with a smaller loss."""
        if not self.speed_gate or not self.evaluator.repeats or self.goal.mode == "pareto":
            return None

        def gate(timing, paired) -> None:
            attrs = _timing_attrs(timing, paired.best, paired, self.eager_time)
            if self.goal.mode == "target":
                bar = self.goal.target_speedup * (1 - self.gate_margin)
            else:
                best = best_feasible(study, self.goal)
                if best is None:
                    return
                bar = best.user_attrs[SPEEDUP] * (1 - self.gate_margin)
            if attrs[SPEEDUP] < bar:
                raise SpeedGate(attrs, f"speed gate: {attrs[SPEEDUP]:.2f}x < {bar:.2f}x, not scored")

        return gate

    def _measure(self, config: Config, study: optuna.Study) -> dict[str, Any]:
        m = self.evaluator.measure(config, gate=self._gate(study))
        if m.reference is None:
            raise ValueError("a trial's speedup needs paired rounds (--repeats >= 1)")
        self.last_images = m.images
        attrs = _timing_attrs(m.timing, m.reference.best, m.reference, self.eager_time)
        attrs[SCORE_LOSS] = score_loss(self.baseline.clip_score, m.clip_score)
        attrs[CLIP_SCORE] = m.clip_score
        attrs[BASELINE_SPREAD] = m.reference.spread
        # psnr, ssim (and lpips) of each image against the baseline image of its prompt; the attrs are means
        start = time.perf_counter()
        fidelity = self.fidelity.per_image(m.images) if self.fidelity is not None else {}
        self.parts[PART_FIDELITY] = time.perf_counter() - start
        attrs.update({k: float(v.mean()) for k, v in fidelity.items()})
        bad = [k for k, v in attrs.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"non-finite {', '.join(bad)} for {config.label()}")
        attrs[INTERVALS] = intervals(self.goal.level, self.baseline.scores, m.scores, fidelity, attrs[SPEEDUP],
                                     m.timing.samples, m.reference.samples, True)
        self.last_per_prompt = {CLIP_SCORE: list(m.scores), **{k: list(v) for k, v in fidelity.items()}}
        return attrs

    def __call__(self, trial: optuna.Trial) -> float:
        """Run the trial; its parts and wall time are recorded however it ends (PARTS, WALL)."""
        start = time.perf_counter()
        self.parts = {}
        try:
            value = self._trial(trial)
        except BaseException:
            try:
                self._record_time(trial, start)
            except Exception:  # noqa: BLE001 - the storage may be what failed: raise the trial's own exception
                pass
            raise
        self._record_time(trial, start)
        return value

    def _record_time(self, trial: optuna.Trial, start: float) -> None:
        trial.set_user_attr(PARTS, {k: round(v, 4) for k, v in self.parts.items()})
        trial.set_user_attr(WALL, round(time.perf_counter() - start, 4))

    def _measure_parts(self, config: Config, trial: optuna.Trial) -> dict[str, Any]:
        """:meth:`_measure`, the evaluator's parts kept in :attr:`parts` also when it raises (the speed gate),
        and the seconds torch spent compiling recorded however it ends (a compile-heavy trial shows as
        such even when gated or failed)."""
        compiling = compile_seconds()
        try:
            return self._measure(config, trial.study)
        finally:
            spent = max(0.0, compile_seconds() - compiling)
            self.parts = {**getattr(self.evaluator, "parts", {}), **self.parts, **({"compile": spent} if spent else {})}
            trial.set_user_attr(COMPILE_SECONDS, spent)

    def _trial(self, trial: optuna.Trial) -> float:
        self.last_images = None  # set by a measurement; a reused one has no images of its own
        self.last_per_prompt = None
        config = self.space.suggest(trial)
        trial.set_user_attr(CONFIG, config.label())
        same = self._same_config(trial.study, trial.params)
        if same is not None:
            # TPE proposes a configuration it has already seen: reuse the measurement, spend no GPU time.
            attrs = {k: v for k, v in same.user_attrs.items()
                     if k not in (CONFIG, ERROR, REUSED_FROM, WORKER, PARTS, WALL, COMPILE_SECONDS)}
            attrs[REUSED_FROM] = same.number
            self.last_per_prompt = same.system_attrs.get(PER_PROMPT)
        else:
            try:
                attrs = self._measure_parts(config, trial)
            except SpeedGate as e:
                for key, value in e.attrs.items():
                    trial.set_user_attr(key, value)
                trial.set_user_attr(SKIPPED, str(e))
                if self.goal.mode == "target":  # infeasible by speed alone; its loss was never measured
                    record_constraints(trial, [self.goal.target_speedup - e.attrs[SPEEDUP], 0.0])
                raise optuna.TrialPruned(str(e)) from None
            except InvalidConfig as e:
                # a draw the levers' cross-field checks refuse (every layout setting off, ToMe at full
                # resolution on SDXL): nothing was measured, nothing failed
                trial.set_user_attr(SKIPPED, f"not a configuration: {e}")
                raise optuna.TrialPruned(f"not a configuration: {e}") from None
            except Exception as e:
                trial.set_user_attr(ERROR, f"{type(e).__name__}: {e}"[:2000])
                raise
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if self.last_per_prompt:
            record_per_prompt(trial, self.last_per_prompt)
        loss = self.goal.loss(attrs)
        if loss is None:
            raise RuntimeError(f"no {self.goal.loss_metric} measurement for {config.label()}")
        record_constraints(trial, self.goal.constraints_of(attrs))  # with --confidence: the conservative ends
        return self.goal.value(attrs[SPEEDUP], loss)
