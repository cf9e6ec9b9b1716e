"""The search: a constrained TPE study over DeepCache / ToMe / T-GATE settings.

Three goals, each under a bound on a loss (``--loss-metric``: relative CLIP score loss by default;
or PSNR, SSIM, LPIPS of each image against the baseline image of the same prompt and seed):

* ``target``: minimise the loss subject to ``speedup >= target`` and ``loss <= max_loss``;
* ``max``: maximise ``speedup`` subject to ``loss <= max_loss``;
* ``pareto``: two objectives, maximise ``speedup`` and minimise the loss, subject to ``loss <= max_loss``.

Each trial switches every allowed method on or off, samples that method's parameters (one Optuna
distribution per parameter name, so TPE's grouped multivariate model sees a fixed space), measures the
configuration against the stored baseline, and records speedup, the losses, time and spread as user
attrs. Constraints go to the ``constraints`` system attr, which optuna-dashboard shows and Optuna 5's
TPE reads for every trial (infeasible trials rank below feasible ones).

Example:
    >>> goal = Goal("max", None, 0.02)
    >>> goal.constraints(speedup=2.1, loss=0.01)
    [-0.01]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from .accelerators import TOME_DOWNSAMPLES, Config, DeepCache, TGate, ToMe
from .baseline import Baseline
from .metrics import LOSS_METRICS, PSNR_CAP, score_loss

CONSTRAINTS_ATTR = "constraints"  # the list optuna-dashboard 0.21 reads to mark trials feasible
MODES = ("target", "max", "pareto")


class _Loss(NamedTuple):
    name: str  # the loss's name (objective and metric names)
    attr: str  # the trial user attr it is computed from
    sign: float  # loss = offset + sign * attr: lower is better for every metric
    offset: float
    constraint: str  # the constraint's name, as optuna-dashboard lists it
    text: str  # axis title


# The loss each --loss-metric puts under the bound, from a trial's user attrs.
_LOSSES = {
    "clip": _Loss("score_loss", "score_loss", 1, 0, "score_loss <= max_loss", "score_loss (relative CLIP score loss)"),
    "psnr": _Loss("neg_psnr", "psnr", -1, 0, "psnr >= min_psnr", "PSNR vs baseline image (dB)"),
    "ssim": _Loss("ssim_loss", "ssim", -1, 1, "1 - ssim <= max_loss", "1 - SSIM vs baseline image"),
    "lpips": _Loss("lpips", "lpips", 1, 0, "lpips <= max_loss", "LPIPS vs baseline image"),
}
LOSS_TEXT = {m: loss.text for m, loss in _LOSSES.items()}


@dataclass(frozen=True)
class Goal:
    """What a study optimises, and under which bound.

    ``max_loss`` bounds the loss of ``loss_metric``: relative CLIP score loss (clip), 1 - SSIM (ssim),
    LPIPS (lpips); for psnr it is the minimum PSNR in dB, and the loss is -PSNR (bound -max_loss).
    """

    mode: str  # "target", "max" or "pareto"
    target_speedup: float | None
    max_loss: float
    loss_metric: str = "clip"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.loss_metric not in LOSS_METRICS:
            raise ValueError(f"unknown loss metric {self.loss_metric!r} (known: {', '.join(LOSS_METRICS)})")
        if self.mode == "target" and self.target_speedup is None:
            raise ValueError("--mode target needs --target-speedup")
        if self.mode != "target" and self.target_speedup is not None:
            raise ValueError(f"--target-speedup implies --mode target, not {self.mode}")
        if self.mode == "target" and not self.target_speedup > 1:
            raise ValueError("--target-speedup must be greater than 1")
        if self.mode == "target" and not math.isfinite(self.target_speedup):
            raise ValueError("--target-speedup must be a finite number")
        if self.loss_metric == "psnr":
            if not 0 < self.max_loss <= PSNR_CAP:
                raise ValueError(f"--max-loss with --loss-metric psnr is the minimum PSNR in dB: must be in (0, {PSNR_CAP:g}]")
        elif not 0 < self.max_loss < 1:
            raise ValueError("--max-loss must be in (0, 1)")

    @property
    def directions(self) -> list[str]:
        return {"target": ["minimize"], "max": ["maximize"], "pareto": ["maximize", "minimize"]}[self.mode]

    @property
    def direction(self) -> str:
        """The single direction of a target or max study (a pareto study has two: :attr:`directions`)."""
        return self.directions[0]

    @property
    def loss_name(self) -> str:
        return _LOSSES[self.loss_metric].name

    @property
    def objective_name(self) -> str:
        """The objective's name (pareto: the first one, speedup)."""
        return self.loss_name if self.mode == "target" else "speedup"

    @property
    def metric_names(self) -> list[str]:
        return ["speedup", self.loss_name] if self.mode == "pareto" else [self.objective_name]

    @property
    def bound(self) -> float:
        """The bound on :meth:`loss` (for psnr: minus the minimum PSNR)."""
        return -self.max_loss if self.loss_metric == "psnr" else self.max_loss

    @property
    def constraint_names(self) -> list[str]:
        return (["speedup >= target"] if self.mode == "target" else []) + [_LOSSES[self.loss_metric].constraint]

    def loss(self, attrs: dict[str, Any]) -> float | None:
        """The loss under the bound, from a trial's user attrs (None if the trial lacks it)."""
        loss = _LOSSES[self.loss_metric]
        return loss.offset + loss.sign * attrs[loss.attr] if loss.attr in attrs else None

    def shown(self, loss: float) -> float:
        """A loss as people read it: the PSNR itself for psnr, the loss otherwise."""
        return -loss if self.loss_metric == "psnr" else loss

    def bound_text(self) -> str:
        if self.loss_metric == "psnr":
            return f"psnr >= {self.max_loss:g} dB"
        return f"{self.loss_name} <= {self.max_loss:g}"

    def constraints(self, speedup: float, loss: float) -> list[float]:
        """Values <= 0 mean satisfied (Optuna's convention)."""
        values = [loss - self.bound]
        return ([self.target_speedup - speedup] + values) if self.mode == "target" else values

    def value(self, speedup: float, loss: float):
        return {"target": loss, "max": speedup, "pareto": [speedup, loss]}[self.mode]

    @property
    def slug(self) -> str:
        head = f"target{self.target_speedup:g}" if self.mode == "target" else self.mode
        metric = "loss" if self.loss_metric == "clip" else self.loss_metric  # clip keeps the names it always had
        return f"{head}-{metric}{self.max_loss:g}"

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "target_speedup": self.target_speedup, "max_loss": self.max_loss,
                "loss_metric": self.loss_metric}


@dataclass(frozen=True)
class SearchSpace:
    """The ranges searched; at least as wide as the original grid (REFERENCE: DeepCache N 2..5, branch
    0..3; ToMe ratio 0.1..0.9, max_downsample 1,2,4; T-GATE gate 5..19, sp 2..9, fi 1..5, warm-up 1..3)."""

    methods: tuple[str, ...]
    steps: int
    max_branch_id: int
    xl: bool = False

    def suggest(self, trial: optuna.Trial) -> Config:
        kwargs: dict[str, Any] = {}
        if "deepcache" in self.methods and trial.suggest_categorical("deepcache", [False, True]):
            kwargs["deepcache"] = DeepCache(
                trial.suggest_int("deepcache.cache_interval", 2, 10),
                trial.suggest_int("deepcache.cache_branch_id", 0, min(5, self.max_branch_id)),
            )
        if "tome" in self.methods and trial.suggest_categorical("tome", [False, True]):
            # tomesd merges at most 75% of tokens with its default 2x2 stride: ratios above that act as 0.75.
            # SDXL has no attention at full resolution, so max_downsample=1 would be a no-op there.
            downsamples = [d for d in TOME_DOWNSAMPLES if not (self.xl and d == 1)]
            kwargs["tome"] = ToMe(
                round(trial.suggest_float("tome.ratio", 0.1, 0.9, step=0.05), 2),
                trial.suggest_categorical("tome.max_downsample", downsamples),
            )
        if "tgate" in self.methods and self.steps > 4 and trial.suggest_categorical("tgate", [False, True]):
            kwargs["tgate"] = TGate(
                # gate_step >= 4 > warm_up keeps every sampled pair valid with fixed distributions
                trial.suggest_int("tgate.gate_step", 4, self.steps - 1),
                trial.suggest_int("tgate.sp_interval", 1, 10),
                trial.suggest_int("tgate.fi_interval", 1, 5),
                trial.suggest_int("tgate.warm_up", 0, 3),
            )
        return Config(**kwargs)


def warm_start_params(methods: tuple[str, ...], steps: int) -> list[dict[str, Any]]:
    """Known-good first trials for a fresh study: DeepCache N=3 and N=5 on branch 0, nothing else on.

    On the search-efficiency benchmark (docs/benchmarks.md) enqueuing these cut the simulated GPU
    time to reach the best configuration by 25-84%; adding T-GATE variants helped less.
    """
    if "deepcache" not in methods:
        return []
    off = {m: False for m in methods if m != "deepcache" and not (m == "tgate" and steps <= 4)}
    return [{"deepcache": True, "deepcache.cache_interval": n, "deepcache.cache_branch_id": 0, **off} for n in (3, 5)]


def make_sampler(seed: int) -> optuna.samplers.TPESampler:
    # constant_liar: trials still running in other workers count as bad guesses, so parallel workers
    # do not all propose the neighbourhood of the same good trial. No constraints_func (deprecated in
    # Optuna 5): TPE reads every trial's constraints from the attr record_constraints writes, in all modes.
    return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed, n_startup_trials=8,
                                      constant_liar=True)


def record_constraints(trial: optuna.Trial, values: list[float]) -> None:
    """Store constraint values where both TPE and optuna-dashboard 0.21 read them.

    ``Trial.set_constraint`` writes per-name keys that the dashboard ignores (it would show every
    trial feasible); the list under ``constraints`` is what ``constraints_func`` wrote, and TPE reads it too.
    """
    trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS_ATTR, [float(v) for v in values])


def is_feasible(trial: FrozenTrial) -> bool:
    cons = trial.system_attrs.get(CONSTRAINTS_ATTR)
    return trial.state == TrialState.COMPLETE and cons is not None and all(c <= 0 for c in cons)


def _measured(trials, goal: Goal) -> list[FrozenTrial]:
    return [t for t in trials if "speedup" in t.user_attrs and goal.loss(t.user_attrs) is not None]


def best_feasible(study: optuna.Study, goal: Goal) -> FrozenTrial | None:
    """Best feasible trial: least loss (ties: more speedup) for target; most speedup (ties: less loss)
    for max and for pareto (its single pick: the fastest point of the feasible front)."""
    trials = _measured((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_feasible(t)),
                       goal)
    return min(trials, key=rank_key(goal), default=None)


def rank_key(goal: Goal):
    """Sort key of measured trials, best first: least loss (ties: more speedup) for target, most
    speedup (ties: less loss) otherwise; then the earlier trial."""
    if goal.mode == "target":
        return lambda t: (goal.loss(t.user_attrs), -t.user_attrs["speedup"], t.number)
    return lambda t: (-t.user_attrs["speedup"], goal.loss(t.user_attrs), t.number)


def pareto_front(trials, goal: Goal | None = None) -> list[FrozenTrial]:
    """Trials no other trial beats on both speedup (higher) and the goal's loss (lower; default: CLIP
    score loss), by loss ascending. Of several trials with the same measurement (a reused configuration)
    only the first is kept."""
    goal = goal or Goal("max", None, 0.02)
    front: list[FrozenTrial] = []
    best_speedup = -math.inf
    for t in sorted(_measured(trials, goal), key=lambda t: (goal.loss(t.user_attrs), -t.user_attrs["speedup"], t.number)):
        if t.user_attrs["speedup"] > best_speedup:
            front.append(t)
            best_speedup = t.user_attrs["speedup"]
    return front


def study_result(study: optuna.Study, goal: Goal) -> tuple[FrozenTrial | None, list[FrozenTrial]]:
    """The best feasible trial and, for a pareto study, its feasible front (else []). A pareto study's
    best is the fastest point of its front, the front's last."""
    if goal.mode == "pareto":
        front = feasible_front(study, goal)
        return (front[-1] if front else None), front
    return best_feasible(study, goal), []


def feasible_front(study: optuna.Study, goal: Goal) -> list[FrozenTrial]:
    """The Pareto front (speedup up, loss down) of the study's feasible trials."""
    return pareto_front([t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_feasible(t)],
                        goal)


class SpeedGate(Exception):
    """A configuration whose timed repeats show it cannot help the goal: its scoring is skipped."""

    def __init__(self, attrs: dict[str, Any], reason: str):
        super().__init__(reason)
        self.attrs = attrs


def _timing_attrs(timing, base: float, paired=None) -> dict[str, Any]:
    """A trial's timing attrs from its configured timing and the baseline time it is divided by
    (``paired``: the baseline calls of its rounds, if any)."""
    attrs = {"speedup": base / timing.best, "time_per_image": timing.best, "time_median": timing.median,
             "spread": timing.spread, "baseline_time": base}
    if paired is not None:
        attrs["rounds"] = len(paired.samples)
    return attrs


class Objective:
    """Optuna objective: suggest, measure, compare with the baseline, record.

    With timed repeats (the GPU default) each measurement pairs its calls with baseline calls made
    seconds apart (:mod:`optimize.measure`) and its speedup comes from those. Without them, speedups
    divide by a *reference* baseline time re-measured in this process every ``retime_every``
    measured trials (and at the start of a resumed run), so slow drift of the machine cancels;
    ``reference`` seeds it (a baseline just measured in this process needs no re-timing). Either
    way the stored baseline keeps the scores.
    """

    def __init__(self, evaluator, baseline: Baseline, goal: Goal, space: SearchSpace,
                 retime_every: int = 10, reference: float | None = None, retime_calls: int = 3,
                 speed_gate: bool = True, gate_margin: float = 0.02, fidelity=None):
        self.evaluator, self.baseline, self.goal, self.space = evaluator, baseline, goal, space
        self.fidelity = fidelity  # a metrics.FidelityScorer holding the baseline images, or None
        self.retime_every, self.retime_calls = retime_every, retime_calls
        self.reference = reference
        self._since_retime = 0
        self.last_images = None
        self.speed_gate, self.gate_margin = speed_gate, gate_margin

    def reference_time(self) -> float:
        if self.reference is None or (self.retime_every and self._since_retime >= self.retime_every):
            self.reference = self.evaluator.time_only(Config(), self.retime_calls).best
            self._since_retime = 0
        return self.reference

    def _same_config(self, study: optuna.Study, params: dict[str, Any]) -> FrozenTrial | None:
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.params == params and "speedup" in t.user_attrs:
                return t
        return None

    def _gate(self, study: optuna.Study):
        """The speed gate: skip scoring a configuration that is too slow to matter, judged from the
        paired rounds timed before the scoring pass (only with ``--repeats`` >= 1). Target mode: more
        than ``gate_margin`` below the target. Max mode: more than ``gate_margin`` below the best
        feasible speedup so far (it cannot become the best, whatever its loss). On the search-efficiency
        simulation this cut GPU time by 55-68% for the same trials. Pareto mode has no gate: a slow
        configuration may still be on the front with a smaller loss."""
        if not self.speed_gate or not self.evaluator.repeats or self.goal.mode == "pareto":
            return None  # without timed repeats there is nothing to judge before the scoring pass

        def gate(timing, paired) -> None:
            attrs = _timing_attrs(timing, paired.best, paired)
            if self.goal.mode == "target":
                bar = self.goal.target_speedup * (1 - self.gate_margin)
            else:
                best = best_feasible(study, self.goal)
                if best is None:
                    return
                bar = best.user_attrs["speedup"] * (1 - self.gate_margin)
            if attrs["speedup"] < bar:
                raise SpeedGate(attrs, f"speed gate: {attrs['speedup']:.2f}x < {bar:.2f}x, not scored")

        return gate

    def _measure(self, config: Config, study: optuna.Study) -> dict[str, Any]:
        m = self.evaluator.measure(config, gate=self._gate(study))
        self.last_images = m.images
        # paired baseline calls when there were rounds; else the re-timed reference
        base = m.reference.best if m.reference is not None else self.reference_time()
        self._since_retime += 1
        attrs = _timing_attrs(m.timing, base, m.reference)
        attrs["score_loss"] = score_loss(self.baseline.clip_score, m.clip_score)
        attrs["clip_score"] = m.clip_score
        if m.reference is not None:
            attrs["baseline_spread"] = m.reference.spread
        if self.fidelity is not None:
            attrs.update(self.fidelity.score(m.images))  # psnr, ssim (and lpips) against the baseline images
        bad = [k for k, v in attrs.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"non-finite {', '.join(bad)} for {config.label()}")
        return attrs

    def __call__(self, trial: optuna.Trial) -> float:
        self.last_images = None  # set by a measurement; a reused one has no images of its own
        config = self.space.suggest(trial)
        trial.set_user_attr("config", config.label())
        same = self._same_config(trial.study, trial.params)
        if same is not None:
            # TPE proposes a configuration it has already seen: reuse the measurement, spend no GPU time.
            attrs = {k: v for k, v in same.user_attrs.items() if k not in ("config", "error", "reused_from", "worker")}
            attrs["reused_from"] = same.number
        else:
            try:
                attrs = self._measure(config, trial.study)
            except SpeedGate as e:
                for key, value in e.attrs.items():
                    trial.set_user_attr(key, value)
                trial.set_user_attr("skipped", str(e))
                if self.goal.mode == "target":  # infeasible by speed alone; its loss was never measured
                    record_constraints(trial, [self.goal.target_speedup - e.attrs["speedup"], 0.0])
                raise optuna.TrialPruned(str(e)) from None
            except Exception as e:
                trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
                raise
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        loss = self.goal.loss(attrs)
        if loss is None:
            raise RuntimeError(f"no {self.goal.loss_metric} measurement for {config.label()}")
        record_constraints(trial, self.goal.constraints(attrs["speedup"], loss))
        return self.goal.value(attrs["speedup"], loss)
