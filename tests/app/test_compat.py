"""Studies and search_params.json files written before the lever protocol (tests/fixtures/study_v0,
made by a1a6d61) still load, resume and generate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import optuna
from helpers import run_cli

FIXTURE = Path(__file__).parents[1] / "fixtures" / "study_v0"
KEY = "tiny:ddim:20:max:0.5"
# the command that made it (README.md beside it), so a resume matches its stored settings
MADE_WITH = ["--pipe", "tiny", "--num-samples", "2", "--validate", "0", "--max-loss", "0.5", "--images-per-trial", "1",
             "--no-progress"]


def _copy(tmp_path) -> tuple[str, Path]:
    shutil.copytree(FIXTURE, tmp_path / "v0")
    return f"sqlite:///{tmp_path / 'v0' / 'study.db'}", tmp_path / "v0" / "search_params.json"


def test_an_old_study_reads_and_resumes_with_its_count_and_baseline(tmp_path, monkeypatch):
    url, params_file = _copy(tmp_path)
    monkeypatch.chdir(tmp_path / "v0")
    code, out, err = run_cli(["best", "--storage", url, "--json"])
    assert code == 0, out + err
    best = json.loads(out)
    assert best["best"]["params"] == json.loads(params_file.read_text())[KEY]["params"]
    old = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    stored_baseline = old.user_attrs["baseline"]
    code, out, err = run_cli(["run", *MADE_WITH, "--storage", url, "--output", str(params_file), "--n-trials", "2",
                              "--score-batch", "2"])
    assert code == 0, out + err
    assert "4 trials so far, adding 2" in out and "reusing the stored baseline" in out, out
    # its baseline images were made one prompt per call: its trials are scored so, to compare with them
    assert "made before --score-batch existed, one call per --batch-size" in out, out
    study = optuna.load_study(study_name=old.study_name, storage=url)
    assert len(study.trials) == 6 and study.user_attrs["baseline"] == stored_baseline
    assert "score_batch" not in stored_baseline
    # the new trials may switch the new lever on; the old ones read as they were
    assert all("schedule" not in t.params for t in study.trials[:4])
    assert all("schedule" in t.params for t in study.trials[4:])
    assert KEY in json.loads(params_file.read_text())


def test_an_old_search_params_entry_and_study_generate(tmp_path, monkeypatch):
    url, params_file = _copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["generate", "--params", str(params_file), "--key", KEY, "a red circle",
                              "-o", str(tmp_path / "a.png")])
    assert code == 0, out + err
    assert "dc(5,b0)" in out and (tmp_path / "a.png").stat().st_size > 0
    code, out, err = run_cli(["generate", "--storage", url, "a red circle", "-o", str(tmp_path / "b.png")])
    assert code == 0, out + err
    from PIL import Image

    pixels = [np.asarray(Image.open(tmp_path / f)) for f in ("a.png", "b.png")]
    np.testing.assert_array_equal(*pixels)  # the same configuration from either (the metadata names its origin)
