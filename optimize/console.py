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

from .study import (BASELINE_TIME, CLIP_SCORE, CONFIG, ERROR, FAIL_REASON, LPIPS, PSNR, REUSED_FROM, SCORE_LOSS,
                    SKIPPED, SPEEDUP, SPEEDUP_EAGER, SPREAD, SSIM, TIME_PER_IMAGE, Goal, is_feasible)

Echo = Callable[..., None]  # echo(line: str, err: bool = False)


def echo(line: str, err: bool = False) -> None:
    """Print one line to stdout (``err``: stderr), at once."""
    print(line, file=sys.stderr if err else sys.stdout, flush=True)


def fidelity_text(attrs: dict[str, Any]) -> str:
    """``psnr 27.1 ssim 0.952 lpips 0.081`` (what the trial has of them)."""
    parts = [f"psnr {attrs[PSNR]:.1f}" if PSNR in attrs else "", f"ssim {attrs[SSIM]:.3f}" if SSIM in attrs else "",
             f"lpips {attrs[LPIPS]:.3f}" if LPIPS in attrs else ""]
    return " ".join(p for p in parts if p)


def trial_line(trial: FrozenTrial) -> str:
    """``#3  dc(3,b0)+tome(0.5,md2)  1.87x ±4%  score_loss +0.012  psnr 27.1 ssim 0.952  feasible``

    The CLIP loss and the fidelity metrics are all shown: feasibility is judged on the study's
    ``--loss-metric``, which may be any of them."""
    attrs = trial.user_attrs
    head = f"#{trial.number:<3d} {attrs.get(CONFIG, '?'):<42s}"
    if trial.state != TrialState.COMPLETE:
        reason = attrs.get(ERROR) or attrs.get(SKIPPED) or trial.system_attrs.get(FAIL_REASON, "")
        return f"{head} {trial.state.name.lower()}: {reason}"[:200]
    reused = f"  (same as #{attrs[REUSED_FROM]})" if REUSED_FROM in attrs else ""
    fidelity = fidelity_text(attrs)
    eager = f" ({attrs[SPEEDUP_EAGER]:.2f}x vs eager)" if SPEEDUP_EAGER in attrs else ""
    return (f"{head} {attrs[SPEEDUP]:5.2f}x ±{100 * attrs[SPREAD]:.0f}%{eager}  score_loss {attrs[SCORE_LOSS]:+.4f}  "
            f"{fidelity + '  ' if fidelity else ''}{'feasible' if is_feasible(trial) else 'infeasible'}{reused}")


def format_best(study_name: str, goal: Goal, trial: FrozenTrial | None, baseline) -> str:
    if trial is None:
        return f"{study_name}: no feasible trial yet"
    e = trial.user_attrs
    fidelity = fidelity_text(e)
    return (f"{study_name}: best feasible trial #{trial.number}: {e[CONFIG]}\n"
            f"  speedup {e[SPEEDUP]:.2f}x (±{100 * e[SPREAD]:.0f}%)"
            + (f", {e[SPEEDUP_EAGER]:.2f}x vs the eager baseline" if SPEEDUP_EAGER in e else "")
            + f", {1000 * e[TIME_PER_IMAGE]:.1f} ms/image "
            f"vs baseline {1000 * e.get(BASELINE_TIME, baseline.time_per_image):.1f} ms; "
            f"score_loss {e[SCORE_LOSS]:+.4f} "
            f"(CLIP {e[CLIP_SCORE]:.2f} vs {baseline.clip_score:.2f}){'; ' + fidelity if fidelity else ''}\n"
            f"  params {dict(trial.params)}")


def loss_text(goal: Goal, attrs: dict[str, Any]) -> str:
    """The loss a study is bounded on, as people read it: ``ssim_loss +0.0312``, ``psnr 27.10 dB``."""
    loss = goal.loss(attrs)
    return f"psnr {goal.shown(loss):.2f} dB" if goal.loss_metric == "psnr" else f"{goal.loss_name} {loss:+.4f}"


def front_line(trial: FrozenTrial, goal: Goal) -> str:
    """One point of a Pareto front: ``#3   dc(3,b0)   2.10x  ssim_loss +0.0312  psnr 27.1 ssim 0.969  score_loss +0.0040``"""
    a = trial.user_attrs
    shown = loss_text(goal, a)
    if goal.loss_metric == "psnr":
        a = {k: v for k, v in a.items() if k != PSNR}  # shown already
    rest = fidelity_text(a) + (f"  score_loss {a[SCORE_LOSS]:+.4f}" if goal.loss_metric != "clip" else "")
    return f"#{trial.number:<3d} {a.get(CONFIG, '?'):<42s} {a[SPEEDUP]:5.2f}x  {shown}  {rest}".rstrip()


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
    """What a finished run and ``best`` print (:func:`optimize.study.study_result` gives ``best`` and
    ``front``): the best feasible trial, or a pareto study's feasible front."""
    if goal.mode == "pareto":
        return format_front(study_name, goal, front, best)
    return format_best(study_name, goal, best, baseline)
