"""The GPU speed benchmark (benchmarks/gpu_speed.py) on the tiny pipeline on CPU: every part runs,
the landscape rows carry the optimizer's paired floors, and bad input stops before a model loads.
CPU timings here mean nothing; the checks are on the shape and consistency of what is written."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_speed.py")


@pytest.fixture(scope="module")
def gpu_speed():
    spec = importlib.util.spec_from_file_location("gpu_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(module, monkeypatch, capsys, *args) -> str:
    """Run the benchmark in this process (torch, diffusers and the tiny models are loaded already);
    return its stdout."""
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    module.main()
    return capsys.readouterr().out


def test_all_parts_run_on_the_tiny_pipeline_and_write_consistent_results(tmp_path, gpu_speed, monkeypatch, capsys):
    from optimize.measure import evaluator as measure

    timed = []  # what the optimizer's Evaluator.time returned, in call order (the landscape's rows)
    original = measure.Evaluator.time

    def record(self, config):
        timed.append((config.label(), *original(self, config)))
        return timed[-1][1:]

    monkeypatch.setattr(measure.Evaluator, "time", record)
    out = _main(gpu_speed, monkeypatch, capsys, "--pipe", "tiny", "--steps", "4", "--quick", "--calls", "1",
                "--p1-rounds", "1", "--p1-prompts", "1", "--parts", "landscape,p1opt,overhead,leaks",
                "--overhead-prompts", "2", "--cycles", "6", "--tag", "t", "--out", str(tmp_path), "--tmp", str(tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "tiny-4steps-bs1-t-landscape.csv")))
    assert len(rows) == 17 and not any(row["error"] for row in rows)
    # each row carries the optimizer's paired floors (Evaluator.time) of its configuration, as measured
    assert [(r["config"], float(r["time"]), float(r["baseline_time"]), int(r["n"])) for r in rows] == [
        (label, t.best, base.best, len(t.samples)) for label, t, base in timed]
    result = json.load(open(tmp_path / "tiny-4steps-bs1-t.json"))
    p1 = result["p1opt"][0]
    assert p1["rounds"] == 1 and set(p1["speedups"]) == {"baseline", "dc3", "dc5+tome+tgate"}
    for run in p1["runs"].values():
        for cell in run.values():  # every call cut at each UNet call: 4 steps -> 5 segments
            assert all(len(call) == 5 for call in cell["segments"] + cell["baseline_segments"])
    assert 0 < result["overhead"]["harness_fraction"] < 1 and result["overhead"]["fidelity_s"] > 0
    leaks = result["leaks"]  # on CPU: the bytes of the live tensors, the pipeline's weights among them
    assert leaks["samples"][0]["allocated_bytes"] > 0 and leaks["allocated_growth"] == 0
    assert "P1  1 rounds dc3" in out and "P2 overhead at 2 prompts" in out


def test_deadline_lists_the_rest_as_not_measured(tmp_path, gpu_speed, monkeypatch, capsys):
    _main(gpu_speed, monkeypatch, capsys, "--pipe", "tiny", "--steps", "2", "--quick", "--calls", "1",
          "--parts", "landscape", "--deadline-s", "0", "--out", str(tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "tiny-2steps-bs1-landscape.csv")))
    assert rows and all(row["error"] == "not measured: --deadline-s reached" for row in rows)



def test_unknown_part_is_one_line_before_anything_loads(tmp_path, gpu_speed, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(gpu_speed, "load_pipeline", refuse)
    with pytest.raises(SystemExit) as exit:
        _main(gpu_speed, monkeypatch, capsys, "--pipe", "tiny", "--parts", "landscape,speed", "--out", str(tmp_path))
    # sys.exit with a message: Python prints it as the one line on stderr and exits 1
    assert isinstance(exit.value.code, str) and "\n" not in exit.value.code
    assert exit.value.code.startswith("unknown part(s): speed")
    assert not os.listdir(tmp_path)
