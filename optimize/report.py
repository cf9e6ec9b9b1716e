"""Human-readable views of a study: one line per trial, the best trial, a trial table."""

from __future__ import annotations

from typing import Any

from optuna.trial import FrozenTrial, TrialState

from .search import Goal, is_feasible


def trial_line(trial: FrozenTrial) -> str:
    """``#3  dc(3,b0)+tome(0.5,md2)  1.87x ±4%  loss +0.012  feasible``"""
    attrs = trial.user_attrs
    head = f"#{trial.number:<3d} {attrs.get('config', '?'):<42s}"
    if trial.state != TrialState.COMPLETE:
        return f"{head} {trial.state.name.lower()}: {attrs.get('error', trial.system_attrs.get('fail_reason', ''))}"[:200]
    reused = f"  (same as #{attrs['reused_from']})" if "reused_from" in attrs else ""
    return (f"{head} {attrs['speedup']:5.2f}x ±{100 * attrs['spread']:.0f}%  loss {attrs['score_loss']:+.4f}  "
            f"{'feasible' if is_feasible(trial) else 'infeasible'}{reused}")


def best_entry(trial: FrozenTrial) -> dict[str, Any]:
    a = trial.user_attrs
    return {
        "trial": trial.number, "config": a["config"], "params": dict(trial.params), "speedup": a["speedup"],
        "score_loss": a["score_loss"], "time_per_image": a["time_per_image"], "spread": a["spread"],
        "clip_score": a["clip_score"],
    }


def summary(study, goal: Goal) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return {"study": study.study_name, "goal": goal.as_dict(), "trials": counts}


def format_best(study_name: str, goal: Goal, trial: FrozenTrial | None, baseline) -> str:
    if trial is None:
        return f"{study_name}: no feasible trial yet"
    e = best_entry(trial)
    return (f"{study_name}: best feasible trial #{e['trial']}: {e['config']}\n"
            f"  speedup {e['speedup']:.2f}x (±{100 * e['spread']:.0f}%), {1000 * e['time_per_image']:.1f} ms/image "
            f"vs baseline {1000 * trial.user_attrs.get('baseline_time', baseline.time_per_image):.1f} ms; "
            f"score_loss {e['score_loss']:+.4f} "
            f"(CLIP {e['clip_score']:.2f} vs {baseline.clip_score:.2f})\n"
            f"  params {e['params']}")
