"""Human-readable views of a study: one line per trial, the best trial, a trial table, and the HTML
report (plotly figures of the whole study in one self-contained file)."""

from __future__ import annotations

import html
import json
import math
import os
import re
import shlex
import warnings
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from .search import CONSTRAINTS_ATTR, Goal, is_feasible
from .storage import atomic_write, redact  # noqa: F401 - also used as report.atomic_write, report.redact


def trial_line(trial: FrozenTrial) -> str:
    """``#3  dc(3,b0)+tome(0.5,md2)  1.87x ±4%  loss +0.012  feasible``"""
    attrs = trial.user_attrs
    head = f"#{trial.number:<3d} {attrs.get('config', '?'):<42s}"
    if trial.state != TrialState.COMPLETE:
        reason = attrs.get("error") or attrs.get("skipped") or trial.system_attrs.get("fail_reason", "")
        return f"{head} {trial.state.name.lower()}: {reason}"[:200]
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


# --- the HTML report -----------------------------------------------------------------------------
# ``optimize-sd report`` writes one self-contained HTML file (plotly.js embedded, so it opens offline):
# the speedup / score_loss plane with the Pareto front, the optimisation history, parameter
# importances, speedup by method combination and the top trials. The figure functions are shared with
# notebooks/analyze_study.ipynb.

MIN_TRIALS_FOR_IMPORTANCE = 5  # PED-ANOVA compares the best 10% of trials with the rest: fewer is noise
FIGURES = ("pareto", "history", "importance", "methods")
_SHORT = {"dc": "deepcache", "tome": "tome", "tgate": "tgate"}


class ReportError(ValueError):
    """A study or output that no report can be made from."""


def open_study(storage_url: str, name: str | None):
    """Load a study for reading: the named one, or the most recently run; never creates a database."""
    from .runner import goal_of, pick_study

    if storage_url.startswith("sqlite:///"):
        path = storage_url[len("sqlite:///"):]
        if path and path != ":memory:" and not os.path.isfile(path):
            raise ReportError(f"no study database at {path} (run a search first, or pass --storage)")
    study = pick_study(storage_url, name)
    goal_of(study)  # refuses a study optimize-sd did not make
    return study


def study_goal(study) -> Goal:
    from .runner import goal_of

    return goal_of(study)


def methods_of(trial: FrozenTrial) -> tuple[str, ...]:
    """The methods a trial switched on, from its params (or its ``config`` label)."""
    from .accelerators import Config, InvalidConfig

    try:
        return Config.from_params(trial.params).methods
    except (InvalidConfig, TypeError):
        label = trial.user_attrs.get("config", "baseline")
        return tuple(_SHORT.get(p.split("(", 1)[0], p.split("(", 1)[0]) for p in label.split("+") if p != "baseline")


def combination(methods: tuple[str, ...]) -> str:
    return "+".join(methods) or "none"


def measured_trials(study) -> list[FrozenTrial]:
    """Completed trials that carry a measurement, in trial order."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "speedup" in t.user_attrs and "score_loss" in t.user_attrs]


def pareto_front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Trials no other trial beats on both speedup (higher) and score_loss (lower), by loss ascending.

    Of several trials with the same measurement (a reused configuration) only the first is kept.
    """
    front: list[FrozenTrial] = []
    best_speedup = -math.inf
    for t in sorted(trials, key=lambda t: (t.user_attrs["score_loss"], -t.user_attrs["speedup"], t.number)):
        if t.user_attrs["speedup"] > best_speedup:
            front.append(t)
            best_speedup = t.user_attrs["speedup"]
    return front


def _violation(trial: FrozenTrial) -> float:
    cons = trial.system_attrs.get(CONSTRAINTS_ATTR) or [math.inf]
    return sum(max(0.0, c) for c in cons)


def ranked_trials(study, goal: Goal) -> list[FrozenTrial]:
    """Measured trials, best first: feasible ones in the order of :func:`best_feasible`, then the
    infeasible ones by how far they miss their constraints."""
    trials = measured_trials(study)
    if goal.mode == "target":
        key = lambda t: (t.user_attrs["score_loss"], -t.user_attrs["speedup"], t.number)  # noqa: E731
    else:
        key = lambda t: (-t.user_attrs["speedup"], t.user_attrs["score_loss"], t.number)  # noqa: E731
    feasible = sorted((t for t in trials if is_feasible(t)), key=key)
    infeasible = sorted((t for t in trials if not is_feasible(t)), key=lambda t: (_violation(t), key(t)))
    return feasible + infeasible


def top_trials(study, goal: Goal | None = None, n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` best measured trials as rows (rank, trial, config, methods, speedup, ...)."""
    goal = goal or study_goal(study)
    rows = []
    for rank, t in enumerate(ranked_trials(study, goal)[:n], 1):
        a = t.user_attrs
        rows.append({
            "rank": rank, "trial": t.number, "config": a.get("config", "?"), "methods": combination(methods_of(t)),
            "speedup": a["speedup"], "score_loss": a["score_loss"], "ms_per_image": 1000 * a.get("time_per_image", math.nan),
            "spread": a.get("spread", math.nan), "clip_score": a.get("clip_score", math.nan),
            "feasible": is_feasible(t), "reused_from": a.get("reused_from"),
        })
    return rows


def _hover(t: FrozenTrial) -> str:
    a = t.user_attrs
    return (f"#{t.number} {a.get('config', '?')}<br>speedup {a['speedup']:.3f}x<br>score_loss {a['score_loss']:+.4f}"
            f"<br>{'feasible' if is_feasible(t) else 'infeasible'}")


def _placeholder(title: str, message: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title=title, template="plotly_white", height=320, xaxis={"visible": False},
                      yaxis={"visible": False},
                      annotations=[{"text": message, "showarrow": False, "font": {"size": 14}, "xref": "paper",
                                    "yref": "paper", "x": 0.5, "y": 0.5}])
    return fig


def pareto_figure(study, goal: Goal | None = None):
    """Speedup against score_loss: feasible and infeasible trials, the Pareto front of the feasible
    ones, the bounds, the baseline and the best feasible trial."""
    import plotly.graph_objects as go

    from .search import best_feasible

    goal = goal or study_goal(study)
    trials = measured_trials(study)
    title = "Speedup vs score_loss"
    if not trials:
        return _placeholder(title, "no completed trial yet")
    feasible = [t for t in trials if is_feasible(t)]
    infeasible = [t for t in trials if not is_feasible(t)]
    fig = go.Figure()

    def scatter(ts, name, **marker):
        fig.add_trace(go.Scatter(
            x=[t.user_attrs["score_loss"] for t in ts], y=[t.user_attrs["speedup"] for t in ts], mode="markers",
            name=f"{name} ({len(ts)})", hovertext=[_hover(t) for t in ts], hoverinfo="text", marker=marker))

    scatter(feasible, "feasible", color="#1f77b4", size=9)
    scatter(infeasible, "infeasible", color="#bbbbbb", size=9, symbol="x")
    front = pareto_front(feasible)
    if front:
        fig.add_trace(go.Scatter(
            x=[t.user_attrs["score_loss"] for t in front], y=[t.user_attrs["speedup"] for t in front],
            mode="lines+markers", line={"shape": "hv", "color": "#d62728"},
            marker={"color": "#d62728", "size": 11, "symbol": "circle-open", "line": {"width": 2}},
            name=f"Pareto front ({len(front)})", hovertext=[_hover(t) for t in front], hoverinfo="text"))
    best = best_feasible(study, goal)
    if best is not None:
        fig.add_trace(go.Scatter(
            x=[best.user_attrs["score_loss"]], y=[best.user_attrs["speedup"]], mode="markers",
            marker={"symbol": "star", "size": 18, "color": "#ff7f0e", "line": {"width": 1, "color": "black"}},
            name=f"best feasible (#{best.number})", hovertext=[_hover(best)], hoverinfo="text"))
    fig.add_trace(go.Scatter(x=[0.0], y=[1.0], mode="markers", name="baseline",
                             marker={"symbol": "diamond", "size": 11, "color": "black"},
                             hovertext=["baseline: 1x, loss 0"], hoverinfo="text"))
    fig.add_vline(x=goal.max_loss, line_dash="dash", line_color="#d62728",
                  annotation_text=f"max_loss {goal.max_loss:g}", annotation_position="top left")
    if goal.mode == "target":
        fig.add_hline(y=goal.target_speedup, line_dash="dash", line_color="#2ca02c",
                      annotation_text=f"target {goal.target_speedup:g}x", annotation_position="bottom right")
    fig.update_layout(title=title, template="plotly_white", height=480,
                      xaxis_title="score_loss (relative CLIP score loss, lower is better)",
                      yaxis_title="speedup (x baseline, higher is better)", legend={"orientation": "h", "y": -0.2})
    return fig


def history_figure(study, goal: Goal | None = None):
    """Optuna's optimisation history of the objective (infeasible trials marked by Optuna)."""
    from optuna.visualization import plot_optimization_history

    goal = goal or study_goal(study)
    if not measured_trials(study):
        return _placeholder("Optimization history", "no completed trial yet")
    fig = plot_optimization_history(study, target_name=goal.objective_name)
    if len(study.get_trials(deepcopy=False)) <= 20:
        fig.update_xaxes(dtick=1)  # trial numbers, not 0.5 steps
    fig.update_layout(title=f"Optimization history ({goal.objective_name}, {goal.direction})", template="plotly_white",
                      height=420)
    return fig


def importance_figure(study, goal: Goal | None = None, min_trials: int = MIN_TRIALS_FOR_IMPORTANCE):
    """Optuna's parameter importances for the objective (PED-ANOVA by default in Optuna 5); a note
    instead while there are fewer than ``min_trials`` completed trials or nothing to compare."""
    from optuna.visualization import plot_param_importances

    goal = goal or study_goal(study)
    title = f"Parameter importances for {goal.objective_name}"
    n = len(measured_trials(study))
    if n < min_trials:
        return _placeholder(title, f"parameter importances need at least {min_trials} completed trials (this study has {n})")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fig = plot_param_importances(study, target_name=goal.objective_name)
    except (ValueError, RuntimeError, ZeroDivisionError, FloatingPointError) as e:  # degenerate studies
        return _placeholder(title, f"parameter importances could not be computed: {type(e).__name__}: {e}"[:200])
    if not fig.data:
        return _placeholder(title, "no parameter varied across the completed trials")
    rough = sorted({m.group(1) for w in caught if (m := re.search(r"parameter `([^`]+)` have less than", str(w.message)))})
    if rough:  # PED-ANOVA warns per parameter; one note on the figure instead
        fig.add_annotation(text=f"rough: few trials per value of {', '.join(rough)}", showarrow=False,
                           xref="paper", yref="paper", x=1, y=-0.12, xanchor="right", font={"size": 11, "color": "#a15c00"})
    fig.update_layout(title=title, template="plotly_white", height=max(340, 80 + 28 * len(fig.data[0].y or ())))
    return fig


def methods_figure(study, goal: Goal | None = None):
    """Speedup of every measured trial, grouped by the combination of methods it switched on."""
    import plotly.graph_objects as go

    trials = measured_trials(study)
    title = "Speedup by method combination"
    if not trials:
        return _placeholder(title, "no completed trial yet")
    groups: dict[str, list[FrozenTrial]] = {}
    for t in trials:
        groups.setdefault(combination(methods_of(t)), []).append(t)
    order = sorted(groups, key=lambda k: -sorted(t.user_attrs["speedup"] for t in groups[k])[len(groups[k]) // 2])
    fig = go.Figure()
    for name in order:
        ts = groups[name]
        fig.add_trace(go.Box(
            x=[f"{name} ({len(ts)})"] * len(ts), y=[t.user_attrs["speedup"] for t in ts], name=name,
            boxpoints="all", jitter=0.4, pointpos=0, hovertext=[_hover(t) for t in ts], hoverinfo="text"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="black", annotation_text="baseline", annotation_position="bottom right")
    fig.update_layout(title=title, template="plotly_white", height=440, showlegend=False,
                      xaxis_title="methods switched on (trials)", yaxis_title="speedup (x baseline)")
    return fig


def report_figures(study, goal: Goal | None = None) -> dict[str, Any]:
    """The report's plotly figures by name (see :data:`FIGURES`), in display order."""
    goal = goal or study_goal(study)
    return {
        "pareto": pareto_figure(study, goal), "history": history_figure(study, goal),
        "importance": importance_figure(study, goal), "methods": methods_figure(study, goal),
    }


def goal_text(goal: Goal) -> str:
    if goal.mode == "target":
        return (f"least score_loss among configurations with speedup >= {goal.target_speedup:g}x "
                f"and score_loss <= {goal.max_loss:g}")
    return f"most speedup with score_loss <= {goal.max_loss:g}"


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return format(value, spec)


def _table_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No completed trial yet.</p>"
    head = ("<tr><th>rank</th><th>trial</th><th>configuration</th><th>methods</th><th>speedup</th>"
            "<th>score_loss</th><th>ms / image</th><th>spread</th><th>CLIP</th><th>feasible</th></tr>")
    body = []
    for r in rows:
        reused = f" <small>(same as #{r['reused_from']})</small>" if r["reused_from"] is not None else ""
        body.append(
            f"<tr class=\"{'feasible' if r['feasible'] else 'infeasible'}\"><td>{r['rank']}</td><td>#{r['trial']}</td>"
            f"<td><code>{html.escape(str(r['config']))}</code>{reused}</td><td>{html.escape(r['methods'])}</td>"
            f"<td>{_fmt(r['speedup'], '.3f')}x</td><td>{_fmt(r['score_loss'], '+.4f')}</td>"
            f"<td>{_fmt(r['ms_per_image'], '.1f')}</td><td>±{_fmt(100 * r['spread'], '.0f')}%</td>"
            f"<td>{_fmt(r['clip_score'], '.3f')}</td><td>{'yes' if r['feasible'] else 'no'}</td></tr>")
    return f"<table id=\"top-trials\">{head}{''.join(body)}</table>"


_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; } dt { font-weight: 600; }
table { border-collapse: collapse; width: 100%; font-size: .9em; }
th, td { border-bottom: 1px solid #ddd; padding: .3em .5em; text-align: left; }
tr.infeasible { color: #888; } code { font-size: .95em; } .note { color: #a15c00; }
pre { background: #f5f5f5; padding: .6em; overflow-x: auto; }
"""


def build_report_html(study, storage_url: str | None = None, top: int = 10) -> str:
    """The whole report as one HTML document with plotly.js embedded."""
    import datetime as _dt

    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    from . import __version__
    from .baseline import Baseline
    from .search import best_feasible

    goal = study_goal(study)
    meta = study.user_attrs.get("optimize_sd", {})
    fp = meta.get("fingerprint", {})
    baseline = Baseline.load(study)
    counts = summary(study, goal)["trials"]
    n_feasible = sum(is_feasible(t) for t in measured_trials(study))
    best = best_feasible(study, goal)
    esc = html.escape

    storage_url = redact(storage_url) if storage_url else None
    info = [("study", esc(study.study_name)), ("storage", esc(storage_url or "")), ("goal", esc(goal_text(goal)))]
    if fp:
        width = fp.get("width") or (baseline.width if baseline else "native")
        size = f"{width}x{fp.get('height') or (baseline.height if baseline else 'native')}"
        info.append(("pipeline", esc(f"{fp.get('pipe')}, {fp.get('scheduler')}, {fp.get('steps')} steps, guidance "
                                     f"{fp.get('guidance') if fp.get('guidance') is not None else 'default'}, {size}, "
                                     f"{fp.get('dtype')} on {fp.get('device')}, batch {fp.get('batch_size')}")))
        info.append(("scoring", esc(f"CLIP {fp.get('clip')} on {fp.get('num_samples')} prompts, seed {fp.get('seed')}")))
    if baseline:
        info.append(("baseline", f"{1000 * baseline.time_per_image:.1f} ms/image (±{100 * baseline.spread:.0f}%), "
                                 f"CLIP {baseline.clip_score:.3f}"))
    info.append(("trials", esc(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none")
                 + f"; {n_feasible} feasible"))
    if best is not None:
        e = best_entry(best)
        info.append(("best feasible", f"#{e['trial']} <code>{esc(e['config'])}</code>: {e['speedup']:.3f}x, "
                                      f"score_loss {e['score_loss']:+.4f}"))
    else:
        info.append(("best feasible", "none yet"))
    random_weights = str(fp.get("pipe", "")).startswith(("random:", "tiny")) or str(fp.get("clip", "")).endswith("/None")
    note = ("<p class=\"note\">Random weights (pipeline or CLIP model): speedups are real, CLIP scores and losses "
            "are meaningless.</p>") if random_weights else ""

    sections = []
    titles = {"pareto": "Speedup vs score_loss", "history": "Optimization history",
              "importance": "Parameter importances", "methods": "Speedup by method combination"}
    for name, fig in report_figures(study, goal).items():
        fig.update_layout(title_text="", margin={"t": 40})  # the section heading names it
        div = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"fig-{name}",
                          config={"displaylogo": False, "responsive": True})
        sections.append(f"<section class=\"figure\" id=\"section-{name}\"><h2>{titles[name]}</h2>{div}</section>")

    use = ""
    if best is not None:
        command = ["optimize-sd", "generate", *(["--storage", storage_url] if storage_url else []),
                   "--study", study.study_name, "a red fox in the snow", "-o", "fox.png"]
        use = (f"<h2>Use it</h2><pre>{esc(shlex.join(command))}</pre>"
               f"<pre>{esc(json.dumps(dict(best.params), indent=2))}</pre>")
    made = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return "\n".join([
        "<!DOCTYPE html>",
        "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>optimize-sd report: {esc(study.study_name)}</title>",
        f"<style>{_STYLE}</style>",
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>",
        "</head><body>",
        f"<h1>optimize-sd report: {esc(study.study_name)}</h1>",
        "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in info) + "</dl>",
        note,
        *sections,
        f"<section id=\"section-top\"><h2>Top trials</h2>{_table_html(top_trials(study, goal, top))}</section>",
        use,
        f"<footer><small>optimize-sd {__version__}, {made}</small></footer>",
        "</body></html>",
    ])


def write_report(study, path: str, storage_url: str | None = None, top: int = 10) -> str:
    """Build the report of ``study`` and write it atomically to ``path``; returns ``path``."""
    atomic_write(path, build_report_html(study, storage_url, top))
    return path
