"""What the terminal shows of a study: one line per trial, the best trial, a pareto study's front.

The library never prints by itself: the functions here return text, and code that reports progress
takes an ``echo(line, err=False)`` callback (:func:`echo` by default; the command line passes
``click.echo``).

Example:
    >>> echo("study tiny-ddim-8steps-max-loss0.02: 0 trials so far, adding 4")
    study tiny-ddim-8steps-max-loss0.02: 0 trials so far, adding 4
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from optuna.trial import FrozenTrial, TrialState

from ..study.record import (BASELINE_TIME, CLIP_SCORE, CONFIG, ERROR, FAIL_REASON, INTERVAL_LEVEL, INTERVAL_N, INTERVALS, LPIPS,
                    PARTS, PSNR, REUSED_FROM, SCORE_LOSS, SEQUENTIAL_PARTS, SKIPPED, SPEEDUP, SPEEDUP_EAGER, SPREAD, SSIM,
                    TIME_PER_IMAGE, WALL, Goal, Validation, is_feasible)

Echo = Callable[..., None]  # echo(line: str, err: bool = False)


def echo(line: str, err: bool = False) -> None:
    """Print one line to stdout (``err``: stderr), at once."""
    print(line, file=sys.stderr if err else sys.stdout, flush=True)


def bracket(interval, spec: str) -> str:
    """`` [-0.0010, +0.0090]`` for an interval (empty for None)."""
    return f" [{format(interval[0], spec)}, {format(interval[1], spec)}]" if interval else ""


def _interval(attrs: dict[str, Any], key: str):
    return (attrs.get(INTERVALS) or {}).get(key)


def fidelity_text(attrs: dict[str, Any], bounded: str | None = None) -> str:
    """``psnr 27.1 ssim 0.952 lpips 0.081`` (what the trial has of them); the ``bounded`` one (a study's
    loss attr) with its interval: ``ssim 0.952 [0.940, 0.964]``."""
    parts = [f"{k} {format(attrs[k], spec)}{bracket(_interval(attrs, k), spec) if k == bounded else ''}"
             for k, spec in ((PSNR, ".1f"), (SSIM, ".3f"), (LPIPS, ".3f")) if k in attrs]
    return " ".join(parts)


def speedup_text(attrs: dict[str, Any]) -> str:
    """``1.87x [1.80, 1.95]``"""
    return f"{attrs[SPEEDUP]:5.2f}x{bracket(_interval(attrs, SPEEDUP), '.2f')}"


def _seconds(value: float) -> str:
    """``8.1``, and two decimals below a second (``0.03``)."""
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def parts_text(attrs: dict[str, Any]) -> str:
    """What a trial's time went on: ``8.1 s: timing 3.0, generation 4.2, clip 0.5, fidelity 0.1 (within
    them: apply 0.0, capture 0.3)``; empty for a trial from before it was recorded."""
    if WALL not in attrs:
        return ""
    parts = attrs.get(PARTS) or {}
    head = ", ".join(f"{k} {_seconds(parts[k])}" for k in SEQUENTIAL_PARTS if k in parts)
    within = ", ".join(f"{k} {_seconds(v)}" for k, v in sorted(parts.items()) if k not in SEQUENTIAL_PARTS)
    return (f"{_seconds(attrs[WALL])} s" + (f": {head}" if head else "")
            + (f" (within them: {within})" if within else ""))


def trial_line(trial: FrozenTrial, goal: Goal | None = None) -> str:
    """``#3  dc(3,b0)+tome(0.5,md2)  1.87x [1.80, 1.95] ±4%  score_loss +0.0120 [+0.0040, +0.0200]  psnr 27.1 ssim 0.952  took 8.1 s  feasible``

    The CLIP loss and the fidelity metrics are all shown: feasibility is judged on the study's
    ``--loss-metric`` (``goal``), which may be any of them; its interval is shown beside it."""
    attrs = trial.user_attrs
    head = f"#{trial.number:<3d} {attrs.get(CONFIG, '?'):<42s}"
    if trial.state != TrialState.COMPLETE:
        reason = attrs.get(ERROR) or attrs.get(SKIPPED) or trial.system_attrs.get(FAIL_REASON, "")
        return f"{head} {trial.state.name.lower()}: {reason}"[:200]
    reused = f"  (same as #{attrs[REUSED_FROM]})" if REUSED_FROM in attrs else ""
    fidelity = fidelity_text(attrs, goal.loss_attr if goal is not None else None)
    eager = f" ({attrs[SPEEDUP_EAGER]:.2f}x vs eager)" if SPEEDUP_EAGER in attrs else ""
    took = f"took {attrs[WALL]:.1f} s  " if WALL in attrs and REUSED_FROM not in attrs else ""
    return (f"{head} {speedup_text(attrs)} ±{100 * attrs[SPREAD]:.0f}%{eager}  score_loss {attrs[SCORE_LOSS]:+.4f}"
            f"{bracket(_interval(attrs, SCORE_LOSS), '+.4f')}  "
            f"{fidelity + '  ' if fidelity else ''}{took}{'feasible' if is_feasible(trial) else 'infeasible'}{reused}")


def interval_note(goal: Goal, attrs: dict[str, Any]) -> str:
    """``90% paired intervals over 8 prompts; constraints on the point estimates`` (empty without intervals)."""
    ints = attrs.get(INTERVALS)
    if not ints:
        return ""
    rule = ("the point estimates" if goal.confidence is None
            else f"the conservative ends (--confidence {goal.confidence:g})")
    return f"{100 * ints[INTERVAL_LEVEL]:g}% paired intervals over {ints[INTERVAL_N]} prompts; constraints on {rule}"


def undecided_note(goal: Goal, attrs: dict[str, Any]) -> str:
    """For a pick feasible on its point estimate whose loss interval reaches past the bound: the prompts
    did not decide the bound (empty otherwise, and with --confidence, where the upper end decided it)."""
    interval = goal.loss_interval(attrs)
    if goal.confidence is not None or interval is None or interval[1] <= goal.bound:
        return ""
    return (f"the loss interval reaches past the bound ({goal.bound_text()}): {attrs[INTERVALS][INTERVAL_N]} prompts "
            "do not show that this pick holds it; more prompts (--num-samples) or --confidence 0.9 decide it")


def loss_with_interval(goal: Goal, loss: float, interval) -> str:
    """The bounded loss as people read it, with its interval: ``score_loss +0.0061 [-0.0030, +0.0150]``,
    ``psnr 27.10 dB [26.50, 27.70]``."""
    if goal.loss_metric == "psnr":
        shown = sorted(goal.shown(v) for v in interval) if interval else None
        return f"psnr {goal.shown(loss):.2f} dB{bracket(shown, '.2f')}"
    return f"{goal.loss_name} {loss:+.4f}{bracket(interval, '+.4f')}"


def validation_text(goal: Goal, v: Validation) -> str:
    """``held-out (4 prompts, seed 1042): score_loss +0.0061 [-0.0030, +0.0150], 1.85x [1.80, 1.90]: within the bound``;
    ``...: within the bound; speedup NOT REPRODUCED (outside the search's [2.90, 3.30])`` when the held-out
    speedup fell outside the interval the search measured."""
    verdict = "within the bound" if v.within_bound else "BREAKS " + ", ".join(v.failed) + " out of sample"
    if v.speedup_reproduced is False:
        verdict += f"; speedup NOT REPRODUCED (outside the search's{bracket(v.search_speedup_interval, '.2f')})"
    return (f"held-out ({v.n} prompts, seed {v.seed}): {loss_with_interval(goal, v.loss, v.loss_interval)}, "
            f"{v.speedup:.2f}x{bracket(v.speedup_interval, '.2f')}: {verdict}")


def reproduced_text(trial: FrozenTrial) -> str:
    """`` not reproduced (held-out 3.94x)`` after a speedup whose held-out validation fell outside its
    interval (empty otherwise): such a number is never shown as a result without it."""
    v = Validation.of(trial)
    return f" not reproduced (held-out {v.speedup:.2f}x)" if v is not None and v.speedup_reproduced is False else ""


def format_best(study_name: str, goal: Goal, trial: FrozenTrial | None, baseline) -> str:
    if trial is None:  # outside target mode a pick must also beat the baseline (optimize.study.record.pick)
        return f"{study_name}: no feasible trial yet" + ("" if goal.mode == "target" else " that is faster than the baseline")
    e = trial.user_attrs
    fidelity = fidelity_text(e, goal.loss_attr)
    note, undecided, held_out = interval_note(goal, e), undecided_note(goal, e), Validation.of(trial)
    return (f"{study_name}: best feasible trial #{trial.number}: {e[CONFIG]}\n"
            f"  speedup {speedup_text(e).strip()}{reproduced_text(trial)} (±{100 * e[SPREAD]:.0f}%)"
            + (f", {e[SPEEDUP_EAGER]:.2f}x vs the eager baseline" if SPEEDUP_EAGER in e else "")
            + f", {1000 * e[TIME_PER_IMAGE]:.1f} ms/image "
            f"vs baseline {1000 * e.get(BASELINE_TIME, baseline.time_per_image):.1f} ms; "
            f"score_loss {e[SCORE_LOSS]:+.4f}{bracket(_interval(e, SCORE_LOSS), '+.4f')} "
            f"(CLIP {e[CLIP_SCORE]:.2f} vs {baseline.clip_score:.2f}){'; ' + fidelity if fidelity else ''}\n"
            + (f"  {note}\n" if note else "")
            + (f"  {undecided}\n" if undecided else "")
            + (f"  {validation_text(goal, held_out)}\n" if held_out else "")
            + (f"  trial {parts_text(e)}\n" if parts_text(e) and REUSED_FROM not in e else "")
            + f"  params {dict(trial.params)}")


def loss_text(goal: Goal, attrs: dict[str, Any]) -> str:
    """The loss a study is bounded on, as people read it: ``ssim_loss +0.0312``, ``psnr 27.10 dB``."""
    return loss_with_interval(goal, goal.loss(attrs), None)


def front_line(trial: FrozenTrial, goal: Goal) -> str:
    """One point of a Pareto front: ``#3   dc(3,b0)   2.10x [2.02, 2.18]  ssim_loss +0.0312 [+0.0250, +0.0374]
    psnr 27.1 ssim 0.969  score_loss +0.0040`` (and ``held-out ok`` once it was re-validated)."""
    a = trial.user_attrs
    shown = loss_with_interval(goal, goal.loss(a), goal.loss_interval(a))
    if goal.loss_metric == "psnr":
        a = {k: v for k, v in a.items() if k != PSNR}  # shown already
    rest = fidelity_text(a) + (f"  score_loss {a[SCORE_LOSS]:+.4f}" if goal.loss_metric != "clip" else "")
    held_out = Validation.of(trial)
    if held_out is not None:
        rest += "  held-out " + ("ok" if held_out.within_bound else "BREAKS the bound")
    return f"#{trial.number:<3d} {a.get(CONFIG, '?'):<42s} {speedup_text(a)}{reproduced_text(trial)}  {shown}  {rest}".rstrip()


def format_front(study_name: str, goal: Goal, front: list[FrozenTrial], best: FrozenTrial | None) -> str:
    """A pareto study's feasible front, one line per trial (fastest last), and its single pick."""
    if not front:
        return f"{study_name}: no feasible trial yet"
    direction = "psnr up" if goal.loss_metric == "psnr" else f"{goal.loss_name} down"
    lines = [f"{study_name}: feasible Pareto front ({len(front)} trial{'s' * (len(front) != 1)}; speedup up, "
             f"{direction}, {goal.bound_text()}):"]
    lines += ["  " + front_line(t, goal) for t in front]
    if best is not None:
        lines.append(f"  fastest feasible (generate's default): #{best.number} {best.user_attrs.get(CONFIG, '?')}")
    return "\n".join(lines)


def format_result(study_name: str, goal: Goal, best: FrozenTrial | None, front: list[FrozenTrial], baseline) -> str:
    """What a finished run and ``best`` print (:func:`optimize.study.record.study_result` gives ``best`` and
    ``front``): the best feasible trial, or a pareto study's feasible front."""
    if goal.mode == "pareto":
        return format_front(study_name, goal, front, best)
    return format_best(study_name, goal, best, baseline)
