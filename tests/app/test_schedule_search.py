"""The schedule lever end to end: searched, stored, shown, reported and generated as a user runs it."""

from __future__ import annotations

import json

from helpers import load_study, run_cli, storage_url

ARGS = ["--pipe", "tiny", "--steps", "8", "--num-samples", "2", "--clip-model", "tiny-clip", "--no-progress",
        "--validate", "0", "--max-loss", "0.5", "--images-per-trial", "0"]


def test_a_search_over_the_schedule_is_stored_shown_and_generated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url, output = storage_url(tmp_path), tmp_path / "search_params.json"
    code, out, err = run_cli(["run", *ARGS, "--methods", "schedule,deepcache", "--n-trials", "3",
                              "--storage", url, "--output", output])
    assert code == 0, out + err
    trials = load_study(url).trials
    # the first warm start: DPM++ at two fifths of the reference's steps, every other lever off
    assert trials[0].params == {"schedule": True, "schedule.solver": "dpm++", "schedule.steps": 3, "deepcache": False}
    assert trials[0].user_attrs["config"] == "sched(dpm++,3)"
    assert "#0   sched(dpm++,3)" in out
    # the search draws the schedule from its declared ranges: below the reference's 8 steps
    drawn = [t.params for t in trials if t.params.get("schedule")]
    assert all(2 <= p["schedule.steps"] <= 7 for p in drawn)

    entry = json.loads(output.read_text())["tiny:ddim:8:max:0.5"]
    code, out, err = run_cli(["best", "--storage", url, "--json"])
    assert code == 0 and json.loads(out)["best"]["params"] == entry["params"], out + err

    # generate from the file: a configuration with the schedule on runs its solver and steps, and says so
    schedule_trial = trials[0]
    code, out, err = run_cli(["generate", "--storage", url, "--trial", str(schedule_trial.number), "a red circle",
                              "-o", tmp_path / "a.png"])
    assert code == 0, out + err
    assert "sched(dpm++,3)" in out and "dpm++, 3 steps instead of the reference's ddim, 8 steps" in out, out

    code, out, err = run_cli(["report", "--storage", url, "-o", tmp_path / "r.html"])
    assert code == 0, out + err
    assert "sched(dpm++,3)" in (tmp_path / "r.html").read_text()
