"""``optimize-sd report``: one self-contained HTML file of a study (plotly.js embedded, so it opens
offline): the speedup / loss plane with the Pareto front, the optimisation history, parameter
importances, speedup by method combination, an image grid (baseline, best, Pareto points) and the top
trials. The figure functions are shared with notebooks/analyze_study.ipynb.

Example:
    >>> write_report(open_study("sqlite:///studies/optimize-sd.db", None), "report.html")  # doctest: +SKIP
    'report.html'
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import re
import shlex
import warnings
from collections import Counter
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from .. import __version__
from ..levers import LEVERS, Config, InvalidConfig
from ..study.artifacts import artifact_dir_for, artifact_store, baseline_image_ids, image_ids, read_png, trial_prefix
from ..study.baseline import Baseline
from .console import bracket, fidelity_text, interval_note, loss_text, loss_with_interval, parts_text, validation_text
from ..study.files import atomic_write
from ..study.storage import redact
from ..study.record import (CLIP_SCORE, CONFIG, CONSTRAINTS_ATTR, LOSS_INTERVAL, LOSS_TEXT, LPIPS, PARTS, PSNR, REUSED_FROM,
                    INTERVALS, SCORE_LOSS, SPEEDUP, SPEEDUP_INTERVAL, SPREAD, SSIM, TIME_PER_IMAGE, VALIDATION,
                    WALL, Goal, StudyRecord, Validation, feasible_front, goal_of, is_feasible, pareto_front, pick,
                    rank_key, study_result)

MIN_TRIALS_FOR_IMPORTANCE = 5  # PED-ANOVA compares the best 10% of trials with the rest: fewer is noise
FIGURES = ("pareto", "history", "importance", "methods")
_SHORT = {lever.short: lever.name for lever in LEVERS}  # label prefix -> lever


def methods_of(trial: FrozenTrial) -> tuple[str, ...]:
    """The methods a trial switched on, from its params (or its ``config`` label)."""
    try:
        return Config.from_params(trial.params).methods
    except (InvalidConfig, TypeError):
        label = trial.user_attrs.get(CONFIG, "baseline")
        return tuple(_SHORT.get(p.split("(", 1)[0], p.split("(", 1)[0]) for p in label.split("+") if p != "baseline")


def combination(methods: tuple[str, ...]) -> str:
    return "+".join(methods) or "none"


def measured_trials(study) -> list[FrozenTrial]:
    """Completed trials that carry a measurement, in trial order."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if SPEEDUP in t.user_attrs and SCORE_LOSS in t.user_attrs]


def scored_trials(study, goal: Goal) -> list[FrozenTrial]:
    """Measured trials that have the goal's loss, in trial order."""
    return [t for t in measured_trials(study) if goal.loss(t.user_attrs) is not None]


def _violation(trial: FrozenTrial) -> float:
    cons = trial.system_attrs.get(CONSTRAINTS_ATTR) or [math.inf]
    return sum(max(0.0, c) for c in cons)


def ranked_trials(study, goal: Goal) -> list[FrozenTrial]:
    """Measured trials, best first: feasible ones in the order of :func:`best_feasible`, then the
    infeasible ones by how far they miss their constraints."""
    trials = scored_trials(study, goal)
    key = rank_key(goal)
    feasible = sorted((t for t in trials if is_feasible(t)), key=key)
    infeasible = sorted((t for t in trials if not is_feasible(t)), key=lambda t: (_violation(t), key(t)))
    return feasible + infeasible


def top_trials(study, goal: Goal | None = None, n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` best measured trials as rows (rank, trial, config, methods, speedup, ...)."""
    goal = goal or goal_of(study)
    rows = []
    for rank, t in enumerate(ranked_trials(study, goal)[:n], 1):
        a = t.user_attrs
        rows.append({
            # the columns named as the trial attrs they show
            "rank": rank, "trial": t.number, CONFIG: a.get(CONFIG, "?"), "methods": combination(methods_of(t)),
            SPEEDUP: a[SPEEDUP], SCORE_LOSS: a[SCORE_LOSS], "ms_per_image": 1000 * a.get(TIME_PER_IMAGE, math.nan),
            SPREAD: a.get(SPREAD, math.nan), CLIP_SCORE: a.get(CLIP_SCORE, math.nan),
            PSNR: a.get(PSNR, math.nan), SSIM: a.get(SSIM, math.nan), LPIPS: a.get(LPIPS, math.nan),
            "feasible": is_feasible(t), REUSED_FROM: a.get(REUSED_FROM),
            # the bounded loss as shown (PSNR itself for psnr), its interval and the speedup's; the held-out result
            "loss_text": loss_with_interval(goal, goal.loss(a), goal.loss_interval(a)),
            LOSS_INTERVAL: goal.loss_interval(a), SPEEDUP_INTERVAL: goal.speedup_interval(a),
            VALIDATION: Validation.of(t),
            # the trial's wall seconds and what they went on (a reused measurement cost nothing of its own)
            WALL: None if REUSED_FROM in a else a.get(WALL), "parts_text": "" if REUSED_FROM in a else parts_text(a),
        })
    return rows


def _hover(t: FrozenTrial) -> str:
    a = t.user_attrs
    fidelity = fidelity_text(a)
    intervals = a.get(INTERVALS) or {}
    return (f"#{t.number} {a.get(CONFIG, '?')}<br>speedup {a[SPEEDUP]:.3f}x{bracket(intervals.get(SPEEDUP), '.3f')}"
            f"<br>score_loss {a[SCORE_LOSS]:+.4f}{bracket(intervals.get(SCORE_LOSS), '+.4f')}"
            f"{'<br>' + fidelity if fidelity else ''}<br>{'feasible' if is_feasible(t) else 'infeasible'}")


def _placeholder(title: str, message: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title=title, template="plotly_white", height=320, xaxis={"visible": False},
                      yaxis={"visible": False},
                      annotations=[{"text": message, "showarrow": False, "font": {"size": 14}, "xref": "paper",
                                    "yref": "paper", "x": 0.5, "y": 0.5}])
    return fig


def _bars(pairs) -> dict | None:
    """Plotly error bars from ``(value, interval)`` pairs (none where no trial has an interval)."""
    if not any(i for _, i in pairs):
        return None
    return {"type": "data", "symmetric": False, "thickness": 1, "width": 0,
            "array": [max(i) - v if i else 0 for v, i in pairs], "arrayminus": [v - min(i) if i else 0 for v, i in pairs]}


def _error_bars(trials, goal: Goal) -> dict[str, Any]:
    """Each trial's loss interval (as shown: PSNR itself for psnr) and speedup interval as error bars."""
    def shown(t):
        interval = goal.loss_interval(t.user_attrs)
        return [goal.shown(v) for v in interval] if interval else None

    return {"error_x": _bars([(goal.shown(goal.loss(t.user_attrs)), shown(t)) for t in trials]),
            "error_y": _bars([(t.user_attrs[SPEEDUP], goal.speedup_interval(t.user_attrs)) for t in trials])}


def pareto_figure(study, goal: Goal | None = None):
    """Speedup against the study's loss (``--loss-metric``; PSNR itself for psnr): feasible and
    infeasible trials, the Pareto front of the feasible ones, the bounds, the baseline and the best
    feasible trial."""
    import plotly.graph_objects as go

    goal = goal or goal_of(study)
    trials = scored_trials(study, goal)
    title = f"Speedup vs {goal.loss_name}"
    if not trials:
        return _placeholder(title, "no completed trial yet")
    feasible = [t for t in trials if is_feasible(t)]
    infeasible = [t for t in trials if not is_feasible(t)]
    fig = go.Figure()

    def x(t):
        return goal.shown(goal.loss(t.user_attrs))

    def scatter(ts, name, **marker):
        fig.add_trace(go.Scatter(
            x=[x(t) for t in ts], y=[t.user_attrs[SPEEDUP] for t in ts], mode="markers",
            name=f"{name} ({len(ts)})", hovertext=[_hover(t) for t in ts], hoverinfo="text", marker=marker,
            **_error_bars(ts, goal)))

    scatter(feasible, "feasible", color="#1f77b4", size=9)
    scatter(infeasible, "infeasible", color="#bbbbbb", size=9, symbol="x")
    front = pareto_front(feasible, goal)
    if front:
        fig.add_trace(go.Scatter(
            x=[x(t) for t in front], y=[t.user_attrs[SPEEDUP] for t in front],
            mode="lines+markers", line={"shape": "hv", "color": "#d62728"},
            marker={"color": "#d62728", "size": 11, "symbol": "circle-open", "line": {"width": 2}},
            name=f"Pareto front ({len(front)})", hovertext=[_hover(t) for t in front], hoverinfo="text"))
    best = pick(feasible, goal)  # best_feasible, from the trials in hand
    if best is not None:
        fig.add_trace(go.Scatter(
            x=[x(best)], y=[best.user_attrs[SPEEDUP]], mode="markers",
            marker={"symbol": "star", "size": 18, "color": "#ff7f0e", "line": {"width": 1, "color": "black"}},
            name=f"best feasible (#{best.number})", hovertext=[_hover(best)], hoverinfo="text"))
    if goal.loss_metric != "psnr":  # the baseline's PSNR is infinite: no point to draw
        fig.add_trace(go.Scatter(x=[0.0], y=[1.0], mode="markers", name="baseline",
                                 marker={"symbol": "diamond", "size": 11, "color": "black"},
                                 hovertext=["baseline: 1x, loss 0"], hoverinfo="text"))
    bound = "min_psnr" if goal.loss_metric == "psnr" else "max_loss"
    fig.add_vline(x=goal.max_loss, line_dash="dash", line_color="#d62728",
                  annotation_text=f"{bound} {goal.max_loss:g}", annotation_position="top left")
    if goal.mode == "target":
        fig.add_hline(y=goal.target_speedup, line_dash="dash", line_color="#2ca02c",
                      annotation_text=f"target {goal.target_speedup:g}x", annotation_position="bottom right")
    fig.update_layout(title=title, template="plotly_white", height=480,
                      xaxis_title=(f"{LOSS_TEXT[goal.loss_metric]}, "
                                   f"{'higher' if goal.loss_metric == 'psnr' else 'lower'} is better"),
                      yaxis_title="speedup (x baseline, higher is better)", legend={"orientation": "h", "y": -0.2})
    return fig


def history_figure(study, goal: Goal | None = None):
    """Optuna's optimisation history of the objective (infeasible trials marked by Optuna)."""
    from optuna.visualization import plot_optimization_history

    goal = goal or goal_of(study)
    if not measured_trials(study):
        return _placeholder("Optimization history", "no completed trial yet")
    fig = plot_optimization_history(study, **_target(goal))
    if len(study.get_trials(deepcopy=False)) <= 20:
        fig.update_xaxes(dtick=1)  # trial numbers, not 0.5 steps
    fig.update_layout(title=f"Optimization history ({goal.objective_name}, {goal.directions[0]})", template="plotly_white",
                      height=420)
    return fig


def _target(goal: Goal) -> dict[str, Any]:
    """Optuna's plots of one objective: a pareto study's is speedup (its first)."""
    if goal.mode == "pareto":
        return {"target": lambda t: t.values[0], "target_name": SPEEDUP}
    return {"target_name": goal.objective_name}


def importance_figure(study, goal: Goal | None = None, min_trials: int = MIN_TRIALS_FOR_IMPORTANCE):
    """Optuna's parameter importances for the objective (PED-ANOVA by default in Optuna 5); a note
    instead while there are fewer than ``min_trials`` completed trials or nothing to compare."""
    from optuna.visualization import plot_param_importances

    goal = goal or goal_of(study)
    title = f"Parameter importances for {goal.objective_name}"
    n = len(measured_trials(study))
    if n < min_trials:
        return _placeholder(title, f"parameter importances need at least {min_trials} completed trials (this study has {n})")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fig = plot_param_importances(study, **_target(goal))
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
    order = sorted(groups, key=lambda k: -sorted(t.user_attrs[SPEEDUP] for t in groups[k])[len(groups[k]) // 2])
    fig = go.Figure()
    for name in order:
        ts = groups[name]
        fig.add_trace(go.Box(
            x=[f"{name} ({len(ts)})"] * len(ts), y=[t.user_attrs[SPEEDUP] for t in ts], name=name,
            boxpoints="all", jitter=0.4, pointpos=0, hovertext=[_hover(t) for t in ts], hoverinfo="text"))
    fig.add_hline(y=1.0, line_dash="dot", line_color="black", annotation_text="baseline", annotation_position="bottom right")
    fig.update_layout(title=title, template="plotly_white", height=440, showlegend=False,
                      xaxis_title="methods switched on (trials)", yaxis_title="speedup (x baseline)")
    return fig


def report_figures(study, goal: Goal | None = None) -> dict[str, Any]:
    """The report's plotly figures by name (see :data:`FIGURES`), in display order."""
    goal = goal or goal_of(study)
    return {
        "pareto": pareto_figure(study, goal), "history": history_figure(study, goal),
        "importance": importance_figure(study, goal), "methods": methods_figure(study, goal),
    }


def goal_text(goal: Goal) -> str:
    if goal.mode == "target":
        return (f"least {goal.loss_name} among configurations with speedup >= {goal.target_speedup:g}x "
                f"and {goal.bound_text()}")
    if goal.mode == "pareto":
        return f"Pareto front of speedup (up) and {goal.loss_name} (down) with {goal.bound_text()}"
    return f"most speedup with {goal.bound_text()}"


def _fmt(value: Any, spec: str) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return format(value, spec)


def _table_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>No completed trial yet.</p>"
    # fidelity columns only where some trial has the value (studies from before, LPIPS without its weights)
    fidelity = [(k, spec) for k, spec in ((PSNR, ".2f"), (SSIM, ".4f"), (LPIPS, ".4f"))
                if any(math.isfinite(r[k]) for r in rows)]
    # the bounded loss with its interval, and the held-out result, where some trial has them
    bounded = any(r[LOSS_INTERVAL] for r in rows)
    held_out = any(r[VALIDATION] for r in rows)
    timed = any(r[WALL] is not None for r in rows)
    head = ("<tr><th>rank</th><th>trial</th><th>configuration</th><th>methods</th><th>speedup</th><th>score_loss</th>"
            + ("<th>bounded loss [interval]</th>" if bounded else "")
            + "".join(f"<th>{k.upper()}</th>" for k, _ in fidelity)
            + "<th>ms / image</th><th>spread</th><th>CLIP</th><th>feasible</th>"
            + ("<th>held-out</th>" if held_out else "")
            + ("<th title=\"wall seconds of the whole trial; hover for its parts\">trial s</th>" if timed else "") + "</tr>")
    body = []
    for r in rows:
        reused = f" <small>(same as #{r[REUSED_FROM]})</small>" if r[REUSED_FROM] is not None else ""
        v = r[VALIDATION]
        body.append(
            f"<tr class=\"{'feasible' if r['feasible'] else 'infeasible'}\"><td>{r['rank']}</td><td>#{r['trial']}</td>"
            f"<td><code>{html.escape(str(r[CONFIG]))}</code>{reused}</td><td>{html.escape(r['methods'])}</td>"
            f"<td>{_fmt(r[SPEEDUP], '.3f')}x{bracket(r[SPEEDUP_INTERVAL], '.2f')}</td><td>{_fmt(r[SCORE_LOSS], '+.4f')}</td>"
            + (f"<td>{html.escape(r['loss_text'])}</td>" if bounded else "")
            + "".join(f"<td>{_fmt(r[k], spec)}</td>" for k, spec in fidelity) +
            f"<td>{_fmt(r['ms_per_image'], '.1f')}</td><td>±{_fmt(100 * r[SPREAD], '.0f')}%</td>"
            f"<td>{_fmt(r[CLIP_SCORE], '.3f')}</td><td>{'yes' if r['feasible'] else 'no'}</td>"
            + ((f"<td class=\"{'' if v.within_bound else 'note'}\">{'ok' if v.within_bound else 'breaks the bound'} "
                f"({v.n} prompts)</td>" if v else "<td></td>") if held_out else "")
            + ((f"<td class=\"wall\" title=\"{html.escape(r['parts_text'])}\">{r[WALL]:.1f}</td>" if r[WALL] is not None
                else "<td></td>") if timed else "") + "</tr>")
    return f"<table id=\"top-trials\">{head}{''.join(body)}</table>"


# --- the image grid: baseline vs best vs a few Pareto points, from the images run stored -------------

GRID_ROWS = 4  # prompts shown
GRID_FRONT = 3  # points of the feasible front shown besides the best


def grid_trials(study, goal: Goal | None = None, n_front: int = GRID_FRONT) -> list[FrozenTrial]:
    """The trials of the image grid: the best feasible one, then up to ``n_front`` other points of the
    feasible Pareto front, spread along it (least loss first)."""
    goal = goal or goal_of(study)
    front = feasible_front(study, goal)
    best = pick(front, goal)  # best_feasible: the best trial is on the front
    others = [t for t in front if best is None or t.number != best.number]
    if len(others) > n_front:
        step = (len(others) - 1) / max(1, n_front - 1)
        others = [others[round(i * step)] for i in range(n_front)] if n_front > 1 else others[:1]
    return ([best] if best is not None else []) + others


def image_grid(study, goal: Goal | None = None, storage_url: str | None = None, artifact_dir: str | None = None,
               rows: int = GRID_ROWS, n_front: int = GRID_FRONT) -> list[dict[str, Any]]:
    """The grid's columns: ``{"title", "detail", "images"}``, ``images`` PNG bytes per prompt (None where
    not readable here); the baseline first. Empty when no image of the study can be read."""
    goal = goal or goal_of(study)
    directory = artifact_dir_for(storage_url or "", artifact_dir)
    if not os.path.isdir(directory):
        return []
    store = artifact_store(directory)

    def read(ids: dict[int, str]) -> list[bytes | None]:
        out = []
        for i in range(rows):
            try:
                out.append(read_png(store, ids[i]))
            except Exception:  # noqa: BLE001 - not stored, or stored on another machine
                out.append(None)
        return out

    columns = [{"title": "baseline", "detail": "no acceleration", "images": read(baseline_image_ids(study))}]
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for i, t in enumerate(grid_trials(study, goal, n_front)):  # the best feasible first, where there is one
        a = t.user_attrs
        source = trials.get(a.get(REUSED_FROM), t)  # a reused measurement shows its source's images
        columns.append({
            "title": f"{'best' if i == 0 else 'Pareto'} #{t.number}",
            "detail": f"{a.get(CONFIG, '?')}: {a[SPEEDUP]:.2f}x, {loss_text(goal, a)}",
            "images": read(image_ids(source, trial_prefix(source.number), storage=study._storage)),
        })
    if not any(im is not None for c in columns for im in c["images"]):
        return []
    used = max(i + 1 for c in columns for i, im in enumerate(c["images"]) if im is not None)
    for c in columns:
        c["images"] = c["images"][:used]
    return columns


def image_grid_html(study, goal: Goal | None = None, storage_url: str | None = None,
                    artifact_dir: str | None = None) -> str:
    """The image grid as an HTML table with the PNGs embedded as data URIs (or a short note)."""
    columns = image_grid(study, goal, storage_url, artifact_dir)
    if not columns:
        return ("<p class=\"note\" id=\"no-images\">No images stored for this study (or its artifact directory "
                "is on another machine): run writes them beside the storage, or in --artifact-dir.</p>")
    esc = html.escape
    head = "".join(f"<th>{esc(c['title'])}<br><small>{esc(c['detail'])}</small></th>" for c in columns)
    captions = grid_prompts(study, len(columns[0]["images"]))
    body = []
    for i in range(len(columns[0]["images"])):
        cells = []
        for c in columns:
            png = c["images"][i]
            if png is None:
                cells.append("<td><small>not stored</small></td>")
            else:
                src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                cells.append(f"<td><img class=\"grid\" src=\"{src}\" alt=\"{esc(c['title'])}, prompt {i}\"></td>")
        caption = f"<br><small class=\"prompt\">{esc(captions[i])}</small>" if captions else ""
        body.append(f"<tr><th>prompt {i}{caption}</th>{''.join(cells)}</tr>")
    return f"<table id=\"image-grid\"><tr><th></th>{head}</tr>{''.join(body)}</table>"


def grid_prompts(study, n: int) -> list[str] | None:
    """The first ``n`` prompts of the study, to caption the grid's rows, where they can be read here
    without network and are those the study used (same hash): the built-in or testbed captions, a file
    still at its path. None otherwise (COCO: the report never downloads)."""
    from ..measure.prompts import PromptsError, load_prompts, prompts_hash

    record = StudyRecord.load(study)
    fp = record.fingerprint if record else None
    source = record.prompt_source if record else None
    if fp is None or not source or source.startswith("coco") or not fp.num_samples:
        return None
    try:
        prompts = load_prompts(source, fp.num_samples)
    except (PromptsError, OSError):
        return None
    return prompts[:n] if prompts_hash(prompts) == fp.prompts else None


_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; } dt { font-weight: 600; }
table { border-collapse: collapse; width: 100%; font-size: .9em; }
th, td { border-bottom: 1px solid #ddd; padding: .3em .5em; text-align: left; }
tr.infeasible { color: #888; } code { font-size: .95em; } .note { color: #a15c00; }
pre { background: #f5f5f5; padding: .6em; overflow-x: auto; }
img.grid { width: 160px; height: auto; image-rendering: pixelated; } #image-grid td, #image-grid th { vertical-align: top; }
#section-top, #section-images { overflow-x: auto; }
#top-trials code { overflow-wrap: anywhere; } #top-trials td, #top-trials th { padding: .3em .35em; }
#image-grid small.prompt { font-weight: normal; display: block; max-width: 12em; }
"""


def _info(study, goal: Goal, storage_url: str | None, best, front) -> list[tuple[str, str]]:
    """The report's head: what the study is, its settings, baseline, trials and best (HTML, escaped)."""
    esc = html.escape
    record = StudyRecord.load(study)
    fp = record.fingerprint if record else None
    baseline = Baseline.load(study)
    info = [("study", esc(study.study_name)), ("storage", esc(storage_url or "")), ("goal", esc(goal_text(goal)))]
    if fp:
        width = fp.width or (baseline.width if baseline else "native")
        size = f"{width}x{fp.height or (baseline.height if baseline else 'native')}"
        info.append(("pipeline", esc(f"{fp.pipe}, {fp.scheduler}, {fp.steps} steps, guidance "
                                     f"{fp.guidance if fp.guidance is not None else 'default'}, {size}, "
                                     f"{fp.dtype} on {fp.device}, batch {fp.batch_size}")))
        calls = (f", {baseline.score_batch} prompts per call" if baseline and baseline.score_batch
                 else f", {fp.batch_size or 1} prompts per call" if baseline else "")
        info.append(("scoring", esc(f"CLIP {fp.clip} on {fp.num_samples} prompts, seed {fp.seed}{calls}")))
    if baseline:
        info.append(("baseline", f"{1000 * baseline.time_per_image:.1f} ms/image (±{100 * baseline.spread:.0f}%), "
                                 f"CLIP {baseline.clip_score:.3f}"))
    time_row = trial_time_text(study)
    if time_row:
        info.append(("trial time", esc(time_row)))
    counts = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    n_feasible = sum(is_feasible(t) for t in measured_trials(study))
    info.append(("trials", esc(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none")
                 + f"; {n_feasible} feasible"))
    label = "fastest feasible (on the front)" if goal.mode == "pareto" else "best feasible"
    if best is not None:
        info += _best_info(best, goal, label)
    else:
        info.append((label, "none yet"))
    if goal.mode == "pareto":
        info.append(("feasible Pareto front", ", ".join(f"#{t.number}" for t in front) or "none yet"))
    return info


def trial_time_text(study) -> str:
    """Medians over the scored trials of their wall time and its parts: ``median of 12 scored trials:
    8.1 s: timing 3.0, generation 4.2, clip 0.5, fidelity 0.1 (within them: capture 0.3)``; empty
    when no trial recorded them (studies from before)."""
    import statistics

    trials = [t.user_attrs for t in measured_trials(study) if WALL in t.user_attrs and REUSED_FROM not in t.user_attrs]
    if not trials:
        return ""
    names = {k for a in trials for k in (a.get(PARTS) or {})}
    median = {WALL: statistics.median(a[WALL] for a in trials),
              PARTS: {k: statistics.median((a.get(PARTS) or {}).get(k, 0.0) for a in trials) for k in names}}
    return f"median of {len(trials)} scored trial{'s' * (len(trials) != 1)}: {parts_text(median)}"


def _best_info(best, goal: Goal, label: str) -> list[tuple[str, str]]:
    """The head's rows of the best trial: its numbers with their intervals, how sure they are, and its
    held-out validation (flagged when it breaks the bound out of sample)."""
    esc, a = html.escape, best.user_attrs
    fidelity = fidelity_text(a, goal.loss_attr)
    rows = [(label, f"#{best.number} <code>{esc(a[CONFIG])}</code>: {a[SPEEDUP]:.3f}x"
                    f"{esc(bracket(goal.speedup_interval(a), '.2f'))}, "
                    f"{esc(loss_with_interval(goal, goal.loss(a), goal.loss_interval(a)))}"
                    f"{esc(', score_loss %+.4f' % a[SCORE_LOSS]) if goal.loss_metric != 'clip' else ''}"
                    f"{', ' + esc(fidelity) if fidelity else ''}")]
    note = interval_note(goal, a)
    if note:
        rows.append(("uncertainty", esc(note)))
    took = "" if REUSED_FROM in a else parts_text(a)
    if took:
        rows.append(("its trial took", esc(took)))
    v = Validation.of(best)
    if v is not None:
        text = esc(validation_text(goal, v))
        rows.append(("held-out validation", text if v.within_bound and v.speedup_reproduced is not False else
                     f"<span class=\"note\" id=\"validation-flag\">{text}</span>"))
    else:
        rows.append(("held-out validation", "not run (optimize-sd validate)"))
    return rows


def _random_weights(study) -> bool:
    """Whether the study's pipeline or CLIP model had random weights (its scores mean nothing)."""
    record = StudyRecord.load(study)
    fp = record.fingerprint if record else None
    return fp is not None and (str(fp.pipe or "").startswith(("random:", "tiny-xl")) or str(fp.clip or "").endswith("/None"))


def _figure_sections(study, goal: Goal) -> list[str]:
    import plotly.io as pio

    sections = []
    titles = {"pareto": f"Speedup vs {goal.loss_name}", "history": "Optimization history",
              "importance": "Parameter importances", "methods": "Speedup by method combination"}
    for name, fig in report_figures(study, goal).items():
        fig.update_layout(title_text="", margin={"t": 40})  # the section heading names it
        div = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"fig-{name}",
                          config={"displaylogo": False, "responsive": True})
        sections.append(f"<section class=\"figure\" id=\"section-{name}\"><h2>{titles[name]}</h2>{div}</section>")
    return sections


def _use_it(study, storage_url: str | None, best) -> str:
    """How to generate with the best trial: the command and its params."""
    if best is None:
        return ""
    esc = html.escape
    command = ["optimize-sd", "generate", *(["--storage", storage_url] if storage_url else []),
               "--study", study.study_name, "a red fox in the snow", "-o", "fox.png"]
    return (f"<h2>Use it</h2><pre>{esc(shlex.join(command))}</pre>"
            f"<pre>{esc(json.dumps(dict(best.params), indent=2))}</pre>")


def build_report_html(study, storage_url: str | None = None, top: int = 10, artifact_dir: str | None = None) -> str:
    """The whole report as one HTML document with plotly.js embedded."""
    from plotly.offline import get_plotlyjs

    goal = goal_of(study)
    best, front = study_result(study, goal)
    esc = html.escape
    shown_url = redact(storage_url) if storage_url else None
    note = ("<p class=\"note\">Random weights (pipeline or CLIP model): speedups are real, CLIP scores and losses "
            "are meaningless.</p>") if _random_weights(study) else ""
    made = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return "\n".join([
        "<!DOCTYPE html>",
        "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>optimize-sd report: {esc(study.study_name)}</title>",
        f"<style>{_STYLE}</style>",
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>",
        "</head><body>",
        f"<h1>optimize-sd report: {esc(study.study_name)}</h1>",
        "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in _info(study, goal, shown_url, best, front)) + "</dl>",
        note,
        *_figure_sections(study, goal),
        f"<section id=\"section-images\"><h2>Images: baseline, best and Pareto points</h2>"
        f"{image_grid_html(study, goal, storage_url, artifact_dir)}</section>",
        f"<section id=\"section-top\"><h2>Top trials</h2>{_table_html(top_trials(study, goal, top))}</section>",
        _use_it(study, shown_url, best),
        f"<footer><small>optimize-sd {__version__}, {made}</small></footer>",
        "</body></html>",
    ])


def write_report(study, path: str, storage_url: str | None = None, top: int = 10,
                 artifact_dir: str | None = None) -> str:
    """Build the report of ``study`` and write it atomically to ``path``; returns ``path``."""
    atomic_write(path, build_report_html(study, storage_url, top, artifact_dir))
    return path
