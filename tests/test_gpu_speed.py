"""The GPU speed benchmark (benchmarks/gpu_speed.py) on the tiny pipeline on CPU: every part runs,
the landscape rows carry the optimizer's paired floors, and bad input stops before a model loads.
CPU timings here mean nothing; the checks are on the shape and consistency of what is written."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_speed.py")


def _run(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_all_parts_run_on_the_tiny_pipeline_and_write_consistent_results(tmp_path):
    r = _run("--pipe", "tiny", "--steps", "4", "--quick", "--calls", "1", "--p1-rounds", "1",
             "--parts", "landscape,p1opt,overhead,leaks", "--overhead-prompts", "2", "--cycles", "6",
             "--tag", "t", "--out", str(tmp_path), "--tmp", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader(open(tmp_path / "tiny-4steps-bs1-t-landscape.csv")))
    assert len(rows) == 17 and not any(row["error"] for row in rows)
    for row in rows:  # speedup is the baseline floor over the configured floor of the same rounds
        assert float(row["speedup"]) == pytest.approx(float(row["baseline_time"]) / float(row["time"]))
    result = json.load(open(tmp_path / "tiny-4steps-bs1-t.json"))
    p1 = result["p1opt"][0]
    assert p1["rounds"] == 1 and set(p1["speedups"]) == {"baseline", "dc3", "dc5+tome+tgate"}
    for run in p1["runs"].values():
        for cell in run.values():  # every call cut at each UNet call: 4 steps -> 5 segments
            assert all(len(call) == 5 for call in cell["segments"] + cell["baseline_segments"])
    assert 0 < result["overhead"]["harness_fraction"] < 1 and result["overhead"]["fidelity_s"] > 0
    assert result["leaks"]["allocated_growth"] == 0
    assert "P1  1 rounds dc3" in r.stdout and "P2 overhead at 2 prompts" in r.stdout


def test_deadline_lists_the_rest_as_not_measured(tmp_path):
    r = _run("--pipe", "tiny", "--steps", "2", "--quick", "--calls", "1", "--parts", "landscape",
             "--deadline-s", "0", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader(open(tmp_path / "tiny-2steps-bs1-landscape.csv")))
    assert rows and all(row["error"] == "not measured: --deadline-s reached" for row in rows)


def test_unknown_part_is_one_line_before_anything_loads(tmp_path):
    r = _run("--pipe", "tiny", "--parts", "landscape,speed", "--out", str(tmp_path), timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("unknown part(s): speed")
    assert not os.listdir(tmp_path)
