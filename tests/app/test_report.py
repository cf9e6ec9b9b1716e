"""Seeing the result: ``optimize-sd report`` and the figures it is made of, notebooks/analyze_study.ipynb,
and the report (and optuna-dashboard) in a real browser.

Most checks use a study made without a model (known trials, so the Pareto front, the ranking and the
grouping are known exactly); the command, the notebook and the browser also run on the shared 4-trial
search of test_search.py / test_cli.py. The browser tests drive headless Chromium over the DevTools
protocol on a pipe and are skipped only where no chromium is installed.
"""

from __future__ import annotations

import base64
import fcntl
import html
import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time

import optuna
import pytest

try:
    from helpers import one_error_line, pareto_run, run_cli, synthetic_study, target_run
except ImportError:  # tests/ made a package
    from tests.helpers import one_error_line, pareto_run, run_cli, synthetic_study, target_run

from optimize.app import report
from optimize.levers import Config, DeepCache, TGate, ToMe
from optimize.study.record import Goal, best_feasible, goal_of, is_feasible, pareto_front

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOAL = Goal("target", 1.5, 0.02)
NAME = "synth<b>&"  # a name that must be escaped in HTML

DC = Config(deepcache=DeepCache(3, 0))
# number: config, speedup, score_loss (target 1.5x, max_loss 0.02)
TRIALS = [
    (DC, 2.0, 0.010),                                                   # 0 feasible, front
    (Config(tome=ToMe(0.5, 2)), 1.3, 0.001),                            # 1 too slow
    (Config(deepcache=DeepCache(5, 1), tome=ToMe(0.6, 1)), 2.6, 0.030),  # 2 too lossy
    (Config(tgate=TGate(6, 2, 1, 1)), 1.6, 0.004),                      # 3 feasible, front, best
    (Config(deepcache=DeepCache(2, 0), tgate=TGate(5, 3, 1, 2)), 1.8, 0.012),  # 4 feasible, dominated by 0
    (Config(tome=ToMe(0.7, 4)), None, None),                            # 5 failed
    (DC, 2.0, 0.010, {"reused_from": 0}),                               # 6 same as 0: not a second front point
    (Config(deepcache=DeepCache(4, 2), tome=ToMe(0.3, 1), tgate=TGate(7, 2, 2, 0)), 2.4, 0.018),  # 7 feasible, front
    (Config(), 1.01, 0.0),                                              # 8 baseline config: too slow
]
FEASIBLE, INFEASIBLE = [0, 3, 4, 6, 7], [1, 2, 8]
FRONT = [3, 0, 7]
RANKED = [3, 0, 6, 4, 7, 2, 1, 8]  # feasible by loss, then infeasible by how far they miss (0.01, 0.2, 0.49)
GROUPS = {"deepcache": [0, 6], "tome": [1], "deepcache+tome": [2], "tgate": [3], "deepcache+tgate": [4],
          "deepcache+tome+tgate": [7], "none": [8]}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic")
    url = f"sqlite:///{directory / 's.db'}"
    study = synthetic_study(url, NAME, GOAL, TRIALS)
    return url, study


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    run = target_run(tmp_path_factory)
    assert run.code == 0, run.out + run.err
    return run


def _numbers(trace) -> list[int]:
    """Trial numbers of a trace, from the ``#N config`` its hover text starts with."""
    return [int(re.match(r"#(\d+) ", h).group(1)) for h in trace.hovertext]


def _trace(fig, prefix: str):
    (trace,) = [t for t in fig.data if (t.name or "").startswith(prefix)]
    return trace


# --- the figures, on known trials --------------------------------------------------------------------


def test_pareto_front_and_ranking(synthetic):
    _, study = synthetic
    assert [t.number for t in report.measured_trials(study)] == [0, 1, 2, 3, 4, 6, 7, 8]  # the failed #5 left out
    feasible = [t for t in report.measured_trials(study) if is_feasible(t)]
    assert [t.number for t in feasible] == FEASIBLE
    assert [t.number for t in pareto_front(feasible)] == FRONT
    rows = report.top_trials(study, GOAL, n=20)
    assert [r["trial"] for r in rows] == RANKED
    assert [r["rank"] for r in rows] == list(range(1, 9))
    assert [r["feasible"] for r in rows] == [True] * 5 + [False] * 3
    assert rows[0]["trial"] == best_feasible(study, GOAL).number
    assert rows[1]["reused_from"] is None and rows[2]["reused_from"] == 0
    assert rows[0]["methods"] == "tgate" and rows[0]["ms_per_image"] == pytest.approx(100 / 1.6)
    assert [r["trial"] for r in report.top_trials(study, GOAL, n=3)] == RANKED[:3]
    # in max mode the same trials rank by speedup
    max_goal = Goal("max", None, 0.02)
    assert [r["trial"] for r in report.top_trials(study, max_goal, n=5)] == [7, 0, 6, 4, 3]


def test_pareto_figure_marks_feasible_infeasible_front_and_best(synthetic):
    _, study = synthetic
    fig = report.pareto_figure(study)
    assert sorted(_numbers(_trace(fig, "feasible"))) == FEASIBLE
    assert sorted(_numbers(_trace(fig, "infeasible"))) == INFEASIBLE
    front = _trace(fig, "Pareto front")
    assert _numbers(front) == FRONT and list(front.x) == [0.004, 0.010, 0.018] and list(front.y) == [1.6, 2.0, 2.4]
    assert _numbers(_trace(fig, "best feasible")) == [3]
    feasible = _trace(fig, "feasible")
    assert sorted(zip(feasible.x, feasible.y)) == sorted((TRIALS[n][2], TRIALS[n][1]) for n in FEASIBLE)
    lines = {(s.type, s.x0, s.y0) for s in fig.layout.shapes}
    assert ("line", 0.02, 0) in lines  # max_loss, a vertical line
    assert any(s.y0 == 1.5 == s.y1 for s in fig.layout.shapes)  # the target speedup
    # max mode: no target line
    assert not any(s.y0 == 1.5 == s.y1 for s in report.pareto_figure(study, Goal("max", None, 0.02)).layout.shapes)


def test_methods_figure_groups_by_combination(synthetic):
    _, study = synthetic
    fig = report.methods_figure(study)
    got = {t.name: sorted(_numbers(t)) for t in fig.data}
    assert got == GROUPS
    assert all(t.type == "box" and t.boxpoints == "all" for t in fig.data)
    medians = [sorted(t.y)[len(t.y) // 2] for t in fig.data]
    assert medians == sorted(medians, reverse=True)  # fastest combination first
    assert fig.data[0].x[0] == "deepcache+tome (1)"


def test_history_marks_infeasible_trials(synthetic):
    _, study = synthetic
    fig = report.history_figure(study)
    infeasible = [t for t in fig.data if t.name == "Infeasible Trial"]
    assert infeasible and sorted(infeasible[0].x) == INFEASIBLE
    best = [t for t in fig.data if t.name == "Best Value"][0]
    assert min(v for v in best.y if v is not None) == pytest.approx(0.004)  # the best feasible loss


def test_importances_need_enough_trials(synthetic):
    _, study = synthetic
    fig = report.importance_figure(study)
    assert len(fig.data) == 1 and fig.data[0].type == "bar"
    names = set(fig.data[0].y)
    assert names and names <= set(Config(deepcache=DeepCache(), tome=ToMe(), tgate=TGate()).to_params())
    few = report.importance_figure(study, min_trials=20)
    assert not few.data
    assert "at least 20 completed trials (this study has 8)" in few.layout.annotations[0].text


def test_figures_of_a_study_without_trials(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = synthetic_study(url, "empty", GOAL, [])
    figures = report.report_figures(study)
    assert list(figures) == list(report.FIGURES)
    for name, fig in figures.items():
        message = fig.layout.annotations[0].text
        assert not fig.data and ("no completed trial yet" in message or "(this study has 0)" in message), name
    code, out, err = run_cli(["report", "--storage", url, "-o", tmp_path / "r.html"])
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert page.count("no completed trial yet") >= 3 and "No completed trial yet." in page


# --- the HTML file -----------------------------------------------------------------------------------


def test_report_html_is_self_contained_and_escaped(synthetic):
    from plotly.offline import get_plotlyjs

    url, study = synthetic
    page = report.build_report_html(study, url)
    assert get_plotlyjs()[:500] in page  # plotly.js embedded ...
    assert page.count(get_plotlyjs()[:500]) == 1  # ... once
    assert not re.search(r"<script[^>]*\bsrc=", page) and "<link" not in page  # nothing fetched
    for name in report.FIGURES:
        assert f'id="fig-{name}"' in page
    assert "synth&lt;b&gt;&amp;" in page and NAME not in page
    table = page[page.index('<table id="top-trials">'):page.index("</table>")]
    assert table.count('<tr class="feasible">') == 5 and table.count('<tr class="infeasible">') == 3
    assert [int(n) for n in re.findall(r"<td>#(\d+)</td>", table)] == RANKED
    assert "(same as #0)" in table
    assert "least score_loss among configurations with speedup &gt;= 1.5x and score_loss &lt;= 0.02" in page
    assert "Random weights" in page  # a tiny pipeline's losses are meaningless, and the page says so
    # a study made without images: a short note where the image grid would be
    assert 'id="no-images"' in page and '<img class="grid"' not in page
    assert "<th>PSNR</th>" not in table  # no trial of it has fidelity values: no empty columns
    shared = report.build_report_html(study, "postgresql://user:secret@db.example/studies")
    assert "secret" not in shared and "postgresql://user:***@db.example/studies" in shared
    best = best_feasible(study, GOAL)
    assert f"--study '{NAME}' 'a red fox in the snow'" in html.unescape(page)  # quoted for the shell
    assert json.dumps(dict(best.params), indent=2) in html.unescape(page)


def test_report_shows_each_trials_wall_time_and_the_median_parts(tmp_path, synthetic):
    """A "trial s" column (its parts on hover) and the head's median of the scored trials' times; a
    study from before they were recorded has neither."""
    timed = [(DC, 2.0, 0.010, {"wall_s": 8.0, "parts": {"timing": 3.0, "generation": 4.0, "clip": 0.5,
                                                           "fidelity": 0.1, "capture": 0.4}}),
             (Config(tgate=TGate(6, 2, 1, 1)), 1.6, 0.004,
              {"wall_s": 6.0, "parts": {"timing": 2.0, "generation": 3.0, "clip": 0.5, "fidelity": 0.3}}),
             (DC, 2.0, 0.010, {"reused_from": 0, "wall_s": 0.01, "parts": {}})]  # cost nothing of its own
    study = synthetic_study(f"sqlite:///{tmp_path / 't.db'}", "timed", GOAL, timed)
    page = report.build_report_html(study)
    table = page[page.index('<table id="top-trials">'):page.index("</table>", page.index('<table id="top-trials">'))]
    assert ">trial s</th>" in table
    assert ('<td class="wall" title="8.0 s: timing 3.0, generation 4.0, clip 0.50, fidelity 0.10 '
            '(within them: capture 0.40)">8.0</td>') in table
    assert table.count('<td class="wall"') == 2  # the reused trial's cell is empty
    assert ("<dt>trial time</dt><dd>median of 2 scored trials: 7.0 s: timing 2.5, generation 3.5, clip 0.50, "
            "fidelity 0.20 (within them: capture 0.20)</dd>") in page
    assert "<dt>its trial took</dt><dd>6.0 s: timing 2.0" in page  # the best is #1, least loss
    old = report.build_report_html(synthetic[1])
    assert "trial s</th>" not in old and "<dt>trial time</dt>" not in old


def test_report_command_on_a_search(target, tmp_path):
    out = tmp_path / "sub" / "report.html"
    code, stdout, err = run_cli(["report", "--storage", target.storage, "--study", target.study_name, "-o", out])
    assert code == 0, err
    assert stdout.strip() == f"wrote {out} (study {target.study_name}, 4 completed trials)"
    page = out.read_text()
    study = target.study()
    for t in study.trials:  # every trial is in the figures and the table
        assert f"#{t.number} {t.user_attrs['config']}" in page
        assert f"<td>#{t.number}</td>" in page
    assert f"<h1>optimize-sd report: {target.study_name}</h1>" in page
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temporary file left
    # the default study is the most recently run one
    code, stdout, err = run_cli(["report", "--storage", target.storage, "-o", tmp_path / "again.html"])
    assert code == 0 and target.study_name in stdout, err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_report_errors_are_one_line(target, tmp_path):
    missing = tmp_path / "missing.db"
    line = one_error_line(*run_cli(["report", "--storage", f"sqlite:///{missing}", "-o", tmp_path / "r.html"]))
    assert "no study database" in line and not missing.exists()  # nothing created
    line = one_error_line(*run_cli(["report", "--storage", target.storage, "--study", "nope", "-o",
                                     tmp_path / "r.html"]))
    assert "no study 'nope'" in line and target.study_name in line
    other = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(storage=other, study_name="foreign")
    line = one_error_line(*run_cli(["report", "--storage", other, "-o", tmp_path / "r.html"]))
    assert "not created by optimize-sd" in line
    one_error_line(*run_cli(["report", "--storage", target.storage, "-o", tmp_path]))  # a directory
    assert not (tmp_path / "r.html").exists()


# --- the notebook ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pareto(tmp_path_factory):
    run = pareto_run(tmp_path_factory)
    assert run.code == 0, run.out + run.err
    return run


@pytest.mark.timeout(300)
@pytest.mark.parametrize("which", ["target", "pareto"])
def test_notebook_runs_on_a_study(which, request, monkeypatch):
    import nbclient
    import nbformat

    target = request.getfixturevalue(which)
    path = os.path.join(ROOT, "notebooks", "analyze_study.ipynb")
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    monkeypatch.setenv("OPTIMIZE_SD_STORAGE", target.storage)
    monkeypatch.setenv("OPTIMIZE_SD_STUDY", target.study_name)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()  # raises CellExecutionError on any failing cell
    text, plots = [], []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            assert o.output_type != "error", o
            if o.output_type == "stream":
                text.append(o.text)
            elif "data" in o:
                text.append(o.data.get("text/plain", "") + o.data.get("text/html", ""))
                if "application/vnd.plotly.v1+json" in o.data:
                    plots.append(o.data["application/vnd.plotly.v1+json"])
    text = "\n".join(text)
    study = target.study()
    assert f"study {target.study_name} ({target.storage})" in text
    assert "Traceback" not in text and "Warning" not in text, text[:3000]
    assert len(plots) == len(report.FIGURES)
    # the Pareto figure shows every trial, the table lists them
    pareto = plots[0]["data"]
    shown = {int(re.match(r"#(\d+) ", h).group(1)) for trace in pareto for h in trace.get("hovertext", [])
             if h.startswith("#")}
    assert shown == {t.number for t in study.trials}
    for t in study.trials:
        assert t.user_attrs["config"] in text
    # the image grid: the baseline's and the shown trials' images of both prompts, embedded
    columns = report.image_grid(study, goal_of(study), target.storage)
    assert 'id="image-grid"' in text and text.count('<img class="grid" src="data:image/png;base64,') == 2 * len(columns)
    best = best_feasible(study, goal_of(study))
    if best is None:
        assert "no feasible trial yet" in text
    elif which == "pareto":
        assert "feasible Pareto front" in text and f"generate's default): #{best.number}" in text
    else:
        assert f"best feasible trial #{best.number}" in text and f"--study {target.study_name}" in text


# --- in a real browser ---------------------------------------------------------------------------------

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``):
    no port, no websocket library."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe"]
    # Chromium reads commands from fd 3 and writes to fd 4: a trampoline puts the pipe ends there.
    TRAMPOLINE = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); "
                  "os.dup2(r, 100); os.dup2(w, 101); os.close(r); os.close(w); "
                  "os.dup2(100, 3); os.dup2(101, 4); os.close(100); os.close(101); os.execv(sys.argv[3], sys.argv[3:])")

    def __init__(self, executable: str, profile_dir: str, log_path: str):
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        self._log = open(log_path, "wb")
        argv = [executable, *self.FLAGS, f"--user-data-dir={profile_dir}", "about:blank"]
        self.proc = subprocess.Popen([sys.executable, "-c", self.TRAMPOLINE, str(cmd_r), str(evt_w), *argv],
                                     pass_fds=(cmd_r, evt_w), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log)
        os.close(cmd_r)
        os.close(evt_w)
        self._out = os.fdopen(cmd_w, "wb", buffering=0)
        self._in = evt_r
        fcntl.fcntl(self._in, fcntl.F_SETFL, fcntl.fcntl(self._in, fcntl.F_GETFL) | os.O_NONBLOCK)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            if select.select([self._in], [], [], left)[0]:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe (exit code {self.proc.poll()})")
                self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._next(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, session: str, since: int, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        i = since
        while True:
            while i < len(self.events):
                if self.events[i].get("method") == method and self.events[i].get("sessionId") == session:
                    return self.events[i]
                i += 1
            self.events.append(self._next(deadline))

    def open(self, url: str, width: int = 1200, height: int = 900) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        since = len(self.events)
        self.send("Page.navigate", {"url": url}, session=session)
        self.wait_event("Page.loadEventFired", session, since)
        return Page(self, session, since)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self._out.close()
        os.close(self._in)
        self._log.close()


class Page:
    def __init__(self, browser: Browser, session: str, since: int):
        self.browser, self.session, self.since = browser, session, since

    def evaluate(self, expression: str, timeout: float = 60):
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                        "returnByValue": True}, session=self.session, timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def _events(self, *methods):
        return [e for e in self.browser.events[self.since:] if e.get("sessionId") == self.session
                and e.get("method") in methods]

    def exceptions(self) -> list[str]:
        return [json.dumps(e["params"]["exceptionDetails"])[:500] for e in self._events("Runtime.exceptionThrown")]

    def errors(self) -> list[str]:
        """Uncaught exceptions, console errors and browser-logged errors (failed loads, ...)."""
        out = self.exceptions()
        out += [json.dumps(e["params"])[:500] for e in self._events("Runtime.consoleAPICalled")
                if e["params"]["type"] in ("error", "assert")]
        out += [json.dumps(e["params"]["entry"])[:500] for e in self._events("Log.entryAdded")
                if e["params"]["entry"]["level"] == "error"]
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self._events("Network.requestWillBeSent")]

    def screenshot(self, path) -> tuple[int, int]:
        size = self.browser.send("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
        width, height = int(size["width"]), int(size["height"])
        shot = self.browser.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}}, session=self.session)
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        return width, height


# Resolves, once every plotly figure on the page has drawn its SVG (or after 30 s), to what each drew.
RENDERED = """new Promise(resolve => { const t0 = Date.now(); (function poll() {
  const divs = [...document.querySelectorAll('.plotly-graph-div')];
  const done = divs.length > 0 && divs.every(d => d.querySelector('svg.main-svg'));
  if (done || Date.now() - t0 > 30000) resolve(divs.map(d => ({
      id: d.id, svgs: d.querySelectorAll('svg.main-svg').length, traces: (d.data || []).length,
      points: d.querySelectorAll('.scatterlayer .point').length, boxes: d.querySelectorAll('.boxlayer .box').length,
      bars: d.querySelectorAll('.barlayer .point').length, text: d.textContent.slice(0, 2000)})));
  else setTimeout(poll, 100); })(); })"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    directory = tmp_path_factory.mktemp("chromium")
    b = Browser(CHROMIUM, str(directory / "profile"), str(directory / "chromium.log"))
    try:
        b.send("Browser.getVersion", timeout=60)
        yield b
    finally:
        b.close()


def _check_page_png(path, width, height):
    from PIL import Image

    with Image.open(path) as image:
        assert image.size == (width, height)
        colours = image.convert("RGB").resize((64, 64)).getcolors(64 * 64)
    assert colours is not None and len(colours) > 20, "the screenshot is (almost) blank"


@needs_chromium
@pytest.mark.timeout(300)
def test_report_renders_in_chromium(browser, synthetic, target, tmp_path):
    url, study = synthetic
    for label, made in (("synthetic", (study, url)), ("search", (target.study(), target.storage))):
        path = tmp_path / f"report-{label}.html"
        report.write_report(made[0], str(path), made[1])
        page = browser.open(path.as_uri())
        figures = {f["id"]: f for f in page.evaluate(RENDERED)}
        assert sorted(figures) == sorted(f"fig-{n}" for n in report.FIGURES), figures.keys()
        for f in figures.values():
            assert f["svgs"] >= 1, f  # plotly drew it
        n = len(report.measured_trials(made[0]))
        pareto, methods = figures["fig-pareto"], figures["fig-methods"]
        # every trial a marker (plus front, best and baseline markers), every combination a box
        assert pareto["points"] >= n + 1, pareto
        assert methods["boxes"] == len({report.combination(report.methods_of(t)) for t in report.measured_trials(made[0])})
        assert "speedup" in pareto["text"] and "score_loss" in pareto["text"]
        if label == "synthetic":
            assert figures["fig-importance"]["bars"] >= 1  # 8 trials: real importances
            assert "Pareto front (3)" in pareto["text"] and "infeasible (3)" in pareto["text"]
        assert page.errors() == []
        # self-contained: nothing else was fetched (the grid's images are data: URIs in the file)
        assert [r for r in page.requests() if not r.startswith("data:image/png;base64,")] == [path.as_uri()]
        sizes = page.evaluate("[...document.querySelectorAll('#image-grid img')].map(i => i.naturalWidth)")
        if label == "synthetic":  # made without a model: no images, a note instead
            assert sizes == [] and page.evaluate("!!document.getElementById('no-images')")
        else:  # baseline, best and front columns of the search's 2 prompts, all decoded by the browser
            assert len(sizes) >= 4 and all(w == 64 for w in sizes), sizes
        shot = tmp_path / f"report-{label}.png"
        width, height = page.screenshot(shot)
        assert height > 1500, height  # four figures and the table, not an error page
        _check_page_png(shot, width, height)


@needs_chromium
@pytest.mark.timeout(300)
def test_dashboard_renders_in_chromium(browser, target, tmp_path):
    """optuna-dashboard (served from the search's storage) shows the study with its plots."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import optuna_dashboard

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = make_server("127.0.0.1", 0, optuna_dashboard.wsgi(target.storage), handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        study = target.study()
        page = browser.open(f"http://127.0.0.1:{server.server_port}/dashboard/studies/{study._study_id}")
        state = page.evaluate("""new Promise(resolve => { const t0 = Date.now(); (function poll() {
            const text = document.body.innerText, svgs = document.querySelectorAll('svg.main-svg').length;
            if ((text.includes(%s) && text.includes('Best Trial') && svgs > 0) || Date.now() - t0 > 30000)
                resolve({text: text.slice(0, 3000), svgs});
            else setTimeout(poll, 200); })(); })""" % json.dumps(target.study_name))
        assert target.study_name in state["text"] and state["svgs"] > 0, state
        assert page.exceptions() == []
        page.screenshot(tmp_path / "dashboard.png")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow  # the shared 4-trial search
def test_image_rows_are_captioned_with_their_prompts(target, tmp_path):
    """Each row of the grid shows its prompt (the study's own, read back where that needs no network)."""
    from optimize.measure.prompts import load_prompts

    html_text = report.build_report_html(target.study(), target.storage, 10, None)
    grid = html_text[html_text.index('id="image-grid"'):]
    for prompt in load_prompts("testbed", 2):
        assert f'<small class="prompt">{html.escape(prompt)}</small>' in grid, prompt


@needs_chromium
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_trial_table_fits_1400_pixels(browser, synthetic, target, tmp_path):
    """The top-trials table (long configurations, intervals, fidelity and held-out columns) scrolled
    sideways in a 1400 px window."""
    for label, (study, url) in (("synthetic", synthetic[::-1]), ("search", (target.study(), target.storage))):
        path = tmp_path / f"report-{label}.html"
        report.write_report(study, str(path), url)
        page = browser.open(path.as_uri(), width=1400)
        sizes = page.evaluate("(() => { const s = document.getElementById('section-top'); "
                              "return [s.scrollWidth, s.clientWidth]; })()")
        assert sizes[0] <= sizes[1], (label, sizes)


# --- optimize-sd dashboard, the command itself ----------------------------------------------------------


def _study_with_images(tmp_path) -> tuple[str, optuna.Study, dict[str, str]]:
    """A study made without a model, with two baseline images in the artifact directory ``run`` would use
    for its storage; ``(url, study, {file name: artifact id})``."""
    from PIL import Image

    from optimize.study.artifacts import artifact_dir_for, artifact_store, upload_images

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = synthetic_study(url, "served", GOAL, TRIALS[:4])
    store = artifact_store(artifact_dir_for(url))
    colours = [(200, 30, 30), (30, 200, 30)]
    ids = upload_images([Image.new("RGB", (64, 64), c) for c in colours], study, store, "baseline")
    return url, study, dict(zip(["baseline-0.png", "baseline-1.png"], ids))


def _default_sigint() -> None:
    """Ctrl-C as a terminal gives it: the notebook test leaves SIGINT ignored in this process, and a
    child that inherits that ignores it too (as a background job of a shell does)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Dashboard:
    """``optimize-sd dashboard`` in a process of its own, on a free port; its stderr (a line per request)
    goes to a file, so that no pipe fills up."""

    def __init__(self, url: str, log_path, *extra: str):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "optimize.cli", "dashboard", "--storage", url, "--port", "0", *extra],
                stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                preexec_fn=_default_sigint)
        self.first = self.proc.stdout.readline()
        m = re.search(r"on http://127\.0\.0\.1:(\d+) ", self.first)
        if m is None:
            self.proc.kill()
            raise AssertionError(f"no address in {self.first!r}: {open(log_path).read()}")
        self.base = f"http://127.0.0.1:{m.group(1)}"

    def request(self, path: str, method: str = "GET", body: dict | None = None) -> tuple[int, bytes]:
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self) -> tuple[int, str, str]:
        """Ctrl-C; ``(exit code, rest of stdout, stderr)``."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # not left serving after the test
            out, _ = self.proc.communicate()
            return None, out, open(self.log_path).read()
        return self.proc.returncode, out, open(self.log_path).read()


@pytest.mark.timeout(120)
def test_the_dashboard_command_changes_nothing(tmp_path):
    """What optuna-dashboard offers to change (its trash and upload buttons, notes, deleting the study) is
    refused with 403, before the dashboard acts: its delete removed the image's file first and only then
    failed on the read-only database (500), so the study kept naming a baseline image that was gone. An
    image missing from the directory is a 404 (it was a 500 with a traceback per image); Ctrl-C stops it
    with one line and exit 0."""
    url, study, ids = _study_with_images(tmp_path)
    directory = tmp_path / "s-artifacts"
    files_before = sorted(os.listdir(directory))
    db_before = (tmp_path / "s.db").read_bytes()
    image = f"data:image/png;base64,{base64.b64encode(b'not really a png').decode()}"
    trial_id = study.trials[0]._trial_id
    dashboard = Dashboard(url, tmp_path / "dashboard.log")
    try:
        sid = study._study_id
        status, body = dashboard.request(f"/artifacts/{sid}/{ids['baseline-0.png']}")
        assert status == 200 and body.startswith(b"\x89PNG")
        for method, path, payload in [
                ("DELETE", f"/api/artifacts/{sid}/{ids['baseline-0.png']}", None),
                ("DELETE", f"/api/artifacts/{sid}/{trial_id}/{ids['baseline-1.png']}", None),
                ("POST", f"/api/artifacts/{sid}", {"file": image, "filename": "x.png"}),
                ("PUT", f"/api/studies/{sid}/note", {"version": 0, "body": "hi"}),
                ("POST", f"/api/studies/{sid}/rename", {"study_name": "other"}),
                ("DELETE", f"/api/studies/{sid}", None)]:
            status, body = dashboard.request(path, method, payload)
            assert status == 403 and b"read-only" in body, (method, path, status, body)
        os.remove(directory / ids["baseline-1.png"])  # as on a machine without the study's images
        status, body = dashboard.request(f"/artifacts/{sid}/{ids['baseline-1.png']}")
        assert status == 404 and b"is not in" in body, (status, body)
    finally:
        code, out, log = dashboard.stop()
    assert code == 0 and out.strip() == "dashboard stopped", (code, out, log)
    assert "Traceback" not in log, log
    assert sorted(os.listdir(directory)) == sorted(set(files_before) - {ids["baseline-1.png"]})
    assert (tmp_path / "s.db").read_bytes() == db_before


def test_the_dashboard_on_a_port_in_use_is_one_line(tmp_path, no_model):
    """It was a traceback from the web server, after a line saying it served on that port."""
    import socket

    url, _, _ = _study_with_images(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(*run_cli(["dashboard", "--storage", url, "--port", port]))
    assert line.endswith(f"cannot serve on 127.0.0.1:{port}: Address already in use; another program uses port "
                         f"{port}: pass another --port"), line


@needs_chromium
@pytest.mark.timeout(300)
def test_the_dashboard_command_shows_the_study_in_chromium(browser, tmp_path):
    """``optimize-sd dashboard`` as a user starts it: the study page loads in a browser with its plots and
    the baseline's images, without a script error."""
    url, study, ids = _study_with_images(tmp_path)
    dashboard = Dashboard(url, tmp_path / "dashboard.log")
    try:
        page = browser.open(f"{dashboard.base}/dashboard/studies/{study._study_id}")
        state = page.evaluate("""new Promise(resolve => { const t0 = Date.now(); (function poll() {
            const text = document.body.innerText, svgs = document.querySelectorAll('svg.main-svg').length;
            const images = [...document.querySelectorAll('img')].filter(i => i.src.includes('/artifacts/'))
                .map(i => [i.src, i.naturalWidth]);
            if ((text.includes('served') && text.includes('Best Trial') && svgs > 0 && images.length >= 2
                 && images.every(i => i[1] > 0)) || Date.now() - t0 > 30000)
                resolve({text: text.slice(0, 3000), svgs, images});
            else setTimeout(poll, 200); })(); })""")
        assert "served" in state["text"] and "Best Trial" in state["text"] and state["svgs"] > 0, state
        shown = {src.rsplit("/", 1)[1]: width for src, width in state["images"]}
        assert shown == {ids["baseline-0.png"]: 64, ids["baseline-1.png"]: 64}, state["images"]
        assert page.errors() == []
        shot = tmp_path / "dashboard.png"
        _check_page_png(shot, *page.screenshot(shot))
    finally:
        code, out, log = dashboard.stop()
    assert code == 0 and "Traceback" not in log, (code, out, log)
