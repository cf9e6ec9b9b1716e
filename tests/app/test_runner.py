"""optimize.app.runner on its own: the names, seeds, fingerprint and pipeline settings of a run (the
whole run is driven through the command line in tests/search and tests/app)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from optimize.app import runner
from optimize.app.settings import PipelineSettings
from optimize.runtime.pipelines import resolve_pipe
from optimize.study.record import Goal

OPTS = runner.RunOptions(
    scheduler="ddim", device="cpu", dtype="fp32", steps=8, guidance=None, height=None, width=None, batch_size=1,
    prompt_spec="builtin", num_samples=2, clip_model="tiny-clip", clip_pretrained=None, repeats=1, scored_repeats=2,
    goal=Goal("max", None, 0.02), methods=("schedule", "deepcache"), n_trials=1, storage="sqlite:///x.db",
    study_name=None, seed=42, output="search_params.json", heartbeat=60, progress=False)


def test_a_study_name_says_what_was_searched_and_in_which_regime():
    spec = resolve_pipe("tiny")
    assert runner.study_name_for(spec, OPTS) == "tiny-ddim-8steps-max-loss0.02"
    assert runner.study_name_for(spec, replace(OPTS, exec_mode="graphs")).endswith("-graphs")


def test_sampler_seeds_are_reproducible_and_distinct_per_run_and_slot():
    assert runner.sampler_seed(42, 0) == runner.sampler_seed(42, 0)
    seeds = {runner.sampler_seed(42, n, slot) for n in (0, 5) for slot in (0, 1)} | {runner.sampler_seed(7, 0)}
    assert len(seeds) == 5


def test_the_fingerprint_holds_the_settings_a_baseline_depends_on():
    fp = runner.fingerprint_for(resolve_pipe("tiny"), OPTS, ["a red circle", "a blue square"])
    assert (fp.scheduler, fp.steps, fp.num_samples, fp.seed, fp.exec) == ("ddim", 8, 2, 42, None)
    other = runner.fingerprint_for(resolve_pipe("tiny"), OPTS, ["a red circle", "a green square"])
    assert fp.prompts != other.prompts


def test_a_runs_pipeline_settings_are_those_validate_and_generate_read_back(tiny_pipe):
    spec = resolve_pipe("tiny")
    settings = runner.settings_for(spec, OPTS)
    fp = runner.fingerprint_for(spec, OPTS, ["a red circle"])
    back = PipelineSettings.of_study("study", fp, None, device="cpu")
    assert (back.spec, back.scheduler, back.steps, back.guidance, back.dtype, back.seed, back.exec) == (
        settings.spec, settings.scheduler, settings.steps, settings.guidance, settings.dtype, settings.seed,
        settings.exec)
    pipe, generation = settings.load()
    assert (generation.height, generation.width, generation.guidance) == (64, 64, 7.5)  # the model decides these
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


@pytest.mark.parametrize("field,value,needle", [
    ("scheduler", "nope", "unknown scheduler"), ("steps", 0, "steps must be a positive integer"),
    ("height", 30, "height must be a positive multiple of 8"), ("dtype", "fp8", "unknown dtype"),
])
def test_stored_settings_are_checked_before_anything_loads(field, value, needle):
    from optimize.app.settings import SettingsError

    args = dict(scheduler="ddim", steps=8, guidance=None, height=None, width=None, dtype="fp32")
    args[field] = value
    with pytest.raises(SettingsError, match=f"^entry: {needle}"):
        PipelineSettings.stored("entry", "tiny", args["scheduler"], args["steps"], args["guidance"], args["height"],
                                args["width"], args["dtype"], seed=0, device="cpu")


def test_a_new_study_scores_in_its_own_batches_and_a_resumed_one_as_its_baseline_was(tmp_path):
    """--score-batch (or its default, at most the prompts) for a study without a baseline; a stored
    baseline's own scoring batch otherwise, whatever the option says (one note when it says otherwise):
    its images were made that way. A study from before it was stored keeps its calls (None)."""
    from dataclasses import asdict

    import optuna

    from optimize.measure.evaluator import GenerationSettings, default_score_batch
    from optimize.study.baseline import Baseline

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    settings = GenerationSettings(steps=8, guidance=7.5, height=64, width=64)
    lines = []

    def batch(score_batch, prompts=8):
        return runner.scoring_batch(study, replace(OPTS, score_batch=score_batch), settings, prompts,
                                    lambda line, err=False: lines.append(line))

    assert batch(3) == 3 and batch(None) == default_score_batch("cpu", 64, 64) and batch(16, prompts=5) == 5
    assert lines == []
    baseline = Baseline(0.1, 0.0, 30.0, [30.0] * 8, {}, 64, 64, score_batch=4)
    baseline.save(study)
    assert batch(None) == 4 and batch(4) == 4 and lines == []
    assert batch(2) == 4 and lines == ["note: this study's baseline images were made in calls of 4 prompts: its trials "
                                       "are scored the same way (--score-batch 2 applies to a new study)"]
    old = {k: v for k, v in asdict(baseline).items() if k != "score_batch"}  # as studies made before stored it
    study.set_user_attr("baseline", old)
    assert Baseline.load(study).score_batch is None
    assert batch(None) is None and batch(8) is None and "before --score-batch existed" in lines[-1]
