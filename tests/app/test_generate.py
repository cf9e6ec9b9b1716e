"""``optimize-sd generate``: images with a study's (or a search_params.json entry's) settings and params.

Bad settings fail with one line before any model loads; a good call writes the image the study's own
protocol would make (same pipeline, scheduler, steps, size, guidance, seed, params): checked pixel for
pixel against the tiny pipeline called directly.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

try:
    from helpers import ERROR_PREFIX, one_error_line, max_run, run_cli, synthetic_study
except ImportError:  # tests/ made a package
    from tests.helpers import ERROR_PREFIX, one_error_line, max_run, run_cli, synthetic_study

import optimize
from optimize.runtime import pipelines
from optimize.levers import Config, DeepCache, TGate, ToMe
from optimize.study.record import Goal, best_feasible

PROMPT = "a red fox in the snow"
PARAMS = {"deepcache": True, "deepcache.cache_interval": 3, "deepcache.cache_branch_id": 0, "tome": False,
          "tgate": True, "tgate.gate_step": 5, "tgate.sp_interval": 2, "tgate.fi_interval": 1, "tgate.warm_up": 1}
ENTRY = {"model": "tiny", "pipe": "tiny", "scheduler": "ddim", "steps": 8, "guidance": 7.5, "height": 64, "width": 64,
         "dtype": "fp32", "params": PARAMS}


@pytest.fixture(scope="module")
def maxrun(tmp_path_factory):
    run = max_run(tmp_path_factory)
    assert run.code == 0, run.out + run.err
    return run


def _params_file(tmp_path, entries: dict) -> str:
    path = tmp_path / "search_params.json"
    path.write_text(json.dumps(entries))
    return str(path)


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _meta(path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["optimize-sd"])


def _direct(pipe, params, prompt=PROMPT, seed=42, steps=8, guidance=7.5, size=64) -> np.ndarray:
    """What the study's protocol makes for ``prompt``: the pipeline called directly."""
    kwargs = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                  generator=torch.Generator("cpu").manual_seed(seed))
    if params is None:
        image = pipe(**kwargs).images[0]
    else:
        with optimize.accelerate(pipe, params, seed=seed) as fast:
            image = fast(**kwargs).images[0]
    return np.asarray(image.convert("RGB"))


# --- bad input: one line, no model -------------------------------------------------------------------

BAD_ENTRIES = {
    "ratio": ({"params": {**PARAMS, "tome": True, "tome.ratio": 1.2, "tome.max_downsample": 1}},
              "tome.ratio must be in (0, 1), got 1.2"),
    "gate_step": ({"params": {**PARAMS, "tgate.gate_step": 8}},
                  "tgate.gate_step (8) must be smaller than the number of steps (8)"),
    "interval": ({"params": {**PARAMS, "deepcache.cache_interval": 0}},
                 "deepcache.cache_interval must be an integer >= 1, got 0"),
    "string": ({"params": {**PARAMS, "tgate.sp_interval": "2"}}, "tgate.sp_interval must be an integer >= 1, got '2'"),
    "unknown": ({"params": {**PARAMS, "tome.speed": 3}}, "unknown parameter(s): tome.speed"),
    "switch": ({"params": {"deepcache": "yes"}}, "deepcache must be true or false"),
    "cfg": ({"guidance": 1.0}, "T-GATE needs classifier-free guidance"),
    "scheduler": ({"scheduler": "fast"}, "unknown scheduler 'fast'"),
    "steps": ({"steps": 0}, "steps must be a positive integer, got 0"),
    "size": ({"height": 30}, "height must be a positive multiple of 8, got 30"),
    "dtype": ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
    "pipe": ({"pipe": "no such model"}, "unknown pipeline 'no such model'"),
    "missing": ({"pipe": None}, "missing pipe"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_bad_entry_is_one_line_and_loads_nothing(case, tmp_path, no_model):
    change, expected = BAD_ENTRIES[case]
    entry = {k: v for k, v in {**ENTRY, **change}.items() if v is not None}
    path = _params_file(tmp_path, {"tiny:ddim:8:max:0.05": entry})
    out = tmp_path / "out.png"
    line = one_error_line(*run_cli(["generate", "--params", path, PROMPT, "-o", out]))
    assert line.startswith(f"{ERROR_PREFIX} {path} [tiny:ddim:8:max:0.05]: ") and expected in line, line
    assert not out.exists()


def test_bad_command_lines_are_one_line_and_load_nothing(tmp_path, maxrun, no_model):
    two = _params_file(tmp_path, {"a": ENTRY, "b": ENTRY, "not:an:entry": {"keep": 1}})
    out = str(tmp_path / "out.png")
    cases = [
        (["--params", two, PROMPT, "-o", out], "has 2 entries: choose one with --key (a, b)"),
        (["--params", two, "--key", "c", PROMPT, "-o", out], "has no entry 'c' (have: a, b)"),
        (["--params", two, "--key", "a", PROMPT, "-o", str(tmp_path / "out.xyz")], "unknown image type '.xyz'"),
        (["--params", two, "--key", "a", PROMPT, "-o", str(tmp_path / "out")], "unknown image type '(no extension)'"),
        (["--params", str(tmp_path / "none.json"), PROMPT, "-o", out], "no such file"),
        (["--params", two, "--study", "x", PROMPT, "-o", out], "leave out --storage, --study and --trial"),
        (["--key", "a", "--storage", maxrun.storage, PROMPT, "-o", out], "--key selects an entry of --params"),
        (["--params", two, "--key", "a", "--device", "tpu", PROMPT, "-o", out], "--device 'tpu'"),
        (["--params", two, "--key", "a", " ", "-o", out], "give at least one non-empty prompt"),
        (["--storage", maxrun.storage, "--trial", "99", PROMPT, "-o", out], "has no trial #99 (trials 0..3)"),
        (["--storage", maxrun.storage, "--study", "nope", PROMPT, "-o", out], "no study 'nope'"),
        (["--storage", f"sqlite:///{tmp_path / 'missing.db'}", PROMPT, "-o", out], "no study database"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--params", two, "--key", "a", "--device", "cuda", PROMPT, "-o", out], "no CUDA GPU"))
    for argv, expected in cases:
        line = one_error_line(*run_cli(["generate", *argv]))
        assert expected in line, (argv, line)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert "is not valid JSON" in one_error_line(*run_cli(["generate", "--params", broken, PROMPT, "-o", out]))
    assert not os.path.exists(out) and not (tmp_path / "missing.db").exists()
    code, out_text, err = run_cli(["generate", "-o", out])
    assert code == 2 and "Missing argument" in err


def test_pipe_sources():
    from optimize.app.settings import spec_from_source

    assert spec_from_source("random:sd1.5") == pipelines.resolve_pipe("sd1.5", random_weights=True)
    assert spec_from_source("random:sdxl").is_xl is True
    assert spec_from_source("tiny").kind == "tiny"
    assert spec_from_source("tiny-xl").is_xl is True
    with pytest.raises(pipelines.PipelineError, match="--random-weights needs a preset"):
        spec_from_source("random:nope")


# --- images --------------------------------------------------------------------------------------------


def test_study_best_trial_and_params_file_give_the_studys_image(maxrun, tmp_path, tiny_pipe):
    """The best feasible trial's params with the study's settings: the same pixels as the pipeline
    called directly, from the study and from its search_params.json entry alike."""
    study = maxrun.study()
    best = best_feasible(study, Goal("max", None, 0.05))
    from_study = tmp_path / "study.png"
    code, out, err = run_cli(["generate", "--storage", maxrun.storage, "--study", maxrun.study_name, PROMPT,
                              "-o", from_study])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (f"study {maxrun.study_name} trial #{best.number}: {best.user_attrs['config']} "
                        "(tiny, ddim, 8 steps, cpu)")
    assert lines[1].startswith(f"wrote {from_study} (64x64, seed 42, ") and lines[1].endswith(PROMPT)
    meta = _meta(from_study)
    assert meta["params"] == Config.from_params(best.params).to_params()
    assert (meta["seed"], meta["steps"], meta["guidance"], meta["prompt"]) == (42, 8, 7.5, PROMPT)
    expected = _direct(tiny_pipe, dict(best.params))
    assert np.array_equal(_pixels(from_study), expected)

    from_file = tmp_path / "file.png"
    code, out, err = run_cli(["generate", "--params", maxrun.output, PROMPT, "-o", from_file])  # its only entry
    assert code == 0, err
    head = f"{maxrun.output} [tiny:ddim:8:max:0.05]: {best.user_attrs['config']} (tiny, ddim, 8 steps, cpu)"
    assert out.splitlines()[0] == head
    assert np.array_equal(_pixels(from_file), expected)


def test_trial_seed_baseline_and_several_images(tmp_path, tiny_pipe):
    """--trial picks any completed trial (an infeasible one with a note), --seed and --baseline change
    what is made, several prompts and --num-images give numbered files; no feasible trial: one line."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    goal = Goal("target", 1.5, 0.02)
    slow = Config(tome=ToMe(0.5, 2))
    fast = Config(deepcache=DeepCache(3, 0), tgate=TGate(5, 2, 1, 1))
    synthetic_study(url, "made", goal, [(slow, 1.2, 0.001), (fast, 1.4, 0.004), (fast, None, None)])
    out = tmp_path / "x.png"
    line = one_error_line(*run_cli(["generate", "--storage", url, PROMPT, "-o", out]))
    assert "has no feasible trial yet; pick one with --trial N" in line
    assert "trial #2 of 'made' is failed" in one_error_line(*run_cli(
        ["generate", "--storage", url, "--trial", "2", PROMPT, "-o", out]))

    code, stdout, err = run_cli(["generate", "--storage", url, "--trial", "1", "--seed", "7", PROMPT, "cat", "-o", out,
                                 "--num-images", "2"])
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0] == "note: trial #1 is infeasible (outside the study's bounds)"
    assert lines[1].startswith(f"study made trial #1: {fast.label()}")
    paths = [tmp_path / f"x-{i}.png" for i in range(4)]
    assert [line.split(" ")[1] for line in lines[2:]] == [str(p) for p in paths] and not out.exists()
    metas = [_meta(p) for p in paths]
    assert [(m["prompt"], m["seed"]) for m in metas] == [(PROMPT, 7), (PROMPT, 7), ("cat", 8), ("cat", 8)]
    assert all(m["params"] == fast.to_params() for m in metas)
    first, second = _pixels(paths[0]), _pixels(paths[1])
    assert not np.array_equal(first, second)  # two images of one prompt

    single = tmp_path / "single.png"
    base = tmp_path / "base.png"
    for argv, path in ((["--seed", "7"], single), (["--seed", "7", "--baseline"], base)):
        code, stdout, err = run_cli(["generate", "--storage", url, "--trial", "1", *argv, PROMPT, "-o", path])
        assert code == 0, err
    assert np.array_equal(_pixels(single), _direct(tiny_pipe, fast.to_params(), seed=7))
    assert np.array_equal(_pixels(base), _direct(tiny_pipe, None, seed=7))
    assert not np.array_equal(_pixels(single), _pixels(base))
    assert _meta(base)["config"] == "baseline"


@pytest.mark.parametrize("command", ["generate", "report"])
def test_help(command, no_model):
    code, out, err = run_cli([command, "--help"])
    assert code == 0 and not err and f"Usage: optimize-sd {command}" in out
    assert ("--params" in out and "--trial" in out) if command == "generate" else "--top" in out


def test_a_configuration_found_in_graph_mode_needs_cuda_to_generate(tmp_path):
    """generate runs a configuration in the mode it was timed in: graphs on a CPU is one clear error."""
    import json

    from optimize.app.generate import GenerateError, plan_from_params_file

    path = tmp_path / "search_params.json"
    path.write_text(json.dumps({"k": {"pipe": "tiny", "scheduler": "ddim", "steps": 4, "dtype": "fp32",
                                      "params": {"deepcache": True}, "exec": "graphs"}}))
    with pytest.raises(GenerateError, match="found with --exec graphs.*needs a CUDA device"):
        plan_from_params_file(str(path), "k", device="cpu")
    data = json.loads(path.read_text())
    data["k"]["exec"] = "eager"
    path.write_text(json.dumps(data))
    assert plan_from_params_file(str(path), "k", device="cpu").exec == "eager"
