"""optimize.runtime.pipelines: resolving --pipe, loading local directories, schedulers, the offline tokenizer."""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import generate, make_pipe

from optimize.runtime.pipelines import (
    PRESETS, SCHEDULERS, PipelineError, clip_tokenizer, is_xl, load_pipeline, resolve_pipe, set_scheduler,
)

PROMPT = ["a red fox in the snow"]


# --- resolve_pipe --------------------------------------------------------------------------------
@pytest.mark.parametrize("name,hub,xl", [
    ("sd1.5", PRESETS["sd1.5"], False),
    ("SD2.1", PRESETS["sd2.1"], False),
    ("sdxl", PRESETS["sdxl"], True),
])
def test_resolve_presets(name, hub, xl):
    spec = resolve_pipe(name)
    assert (spec.name, spec.source, spec.kind, spec.is_xl) == (name.lower(), hub, "hub", xl)


@pytest.mark.parametrize("name,xl", [("tiny", False), ("tiny-xl", True)])
def test_resolve_tiny(name, xl):
    spec = resolve_pipe(name)
    assert (spec.name, spec.source, spec.kind, spec.is_xl) == (name, name, name, xl)
    assert spec.slug == name


def test_resolve_hub_id():
    spec = resolve_pipe("some-org/My_Model.v2")
    assert (spec.source, spec.kind, spec.is_xl) == ("some-org/My_Model.v2", "hub", None)
    assert spec.slug == "some-org-my_model.v2"


@pytest.mark.parametrize("name", ["not-a-model", "", "org/na me"])
def test_resolve_unknown(name):
    with pytest.raises(PipelineError, match="unknown pipeline"):
        resolve_pipe(name)


@pytest.mark.parametrize("name", ["./missing-dir", "../missing", "/no/such/dir", "~/nope", "a/b/c", "org/name/"])
def test_a_path_that_does_not_exist_is_no_such_directory_not_a_hub_id(name):
    """diffusers took ``./missing-dir`` (it matches org/name) for a hub id: "Repo id must use
    alphanumeric chars", after the study was made."""
    with pytest.raises(PipelineError, match=f"^--pipe {re.escape(name)}: no such directory$"):
        resolve_pipe(name)


def test_resolve_directory_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match="model_index.json"):
        resolve_pipe(str(empty))

    bad_json = tmp_path / "bad"
    bad_json.mkdir()
    (bad_json / "model_index.json").write_text("{not json")
    with pytest.raises(PipelineError, match="cannot read"):
        resolve_pipe(str(bad_json))

    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(PipelineError, match="FluxPipeline.*not supported"):
        resolve_pipe(str(other))


# --- loading a local directory -------------------------------------------------------------------
@pytest.fixture(scope="module", params=["tiny", "tiny-xl"])
def saved(request, tmp_path_factory):
    """(name, original pipeline with DDIM, directory it was saved to)."""
    original = make_pipe(request.param, "ddim")
    target = tmp_path_factory.mktemp("pipes") / f"saved-{request.param}"
    original.save_pretrained(target)
    return request.param, original, target


def test_load_local_directory(saved):
    name, original, target = saved
    spec = resolve_pipe(str(target))
    assert (spec.kind, spec.is_xl, spec.slug) == ("dir", name == "tiny-xl", f"saved-{name}")
    loaded = load_pipeline(spec, "dpm++", "cpu", "fp32")

    assert type(loaded).__name__ == ("StableDiffusionXLPipeline" if name == "tiny-xl" else "StableDiffusionPipeline")
    assert type(loaded.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert is_xl(loaded) == (name == "tiny-xl")
    assert getattr(loaded, "safety_checker", None) is None

    # the same image as the original with the same scheduler
    copy = type(original)(**original.components)
    copy.scheduler = type(loaded.scheduler).from_config(loaded.scheduler.config)
    copy.set_progress_bar_config(disable=True)
    assert np.array_equal(generate(loaded, PROMPT, 4), generate(copy, PROMPT, 4))


def test_load_local_directory_keeps_scheduler(saved):
    name, original, target = saved
    loaded = load_pipeline(resolve_pipe(str(target)), "ddim", "cpu", "fp32")
    assert dict(loaded.scheduler.config)["timestep_spacing"] == original.scheduler.config.timestep_spacing
    assert np.array_equal(generate(loaded, PROMPT, 4), generate(original, PROMPT, 4))


@pytest.mark.parametrize("scheduler", ["dpm++", "unipc", "euler"])
def test_set_scheduler_same_schedule_in_memory_and_saved(saved, scheduler):
    name, original, target = saved
    in_memory = SimpleNamespace(scheduler=original.scheduler)  # what load_pipeline does to the built pipe
    set_scheduler(in_memory, scheduler)
    from_dir = load_pipeline(resolve_pipe(str(target)), scheduler, "cpu", "fp32")
    in_memory.scheduler.set_timesteps(4)
    from_dir.scheduler.set_timesteps(4)
    assert in_memory.scheduler.timesteps.tolist() == from_dir.scheduler.timesteps.tolist()


def test_load_directory_failure_is_pipeline_error(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(PipelineError, match="could not load pipeline"):
        load_pipeline(resolve_pipe(str(broken)), "ddim", "cpu", "fp32")


def test_check_loadable_accepts_a_saved_pipeline_and_names_what_is_missing(saved, tmp_path):
    """Checked before a study is created: a directory missing a component's weights, or a component."""
    import shutil

    from optimize.runtime.pipelines import check_loadable

    name, _, target = saved
    check_loadable(resolve_pipe(str(target)))
    broken = tmp_path / "broken"
    shutil.copytree(target, broken, ignore=lambda d, names: [n for n in names if n.endswith(".safetensors")
                                                              and os.path.basename(d) == "unet"])
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(PipelineError) as e:
        check_loadable(resolve_pipe(str(broken)))
    assert str(e.value) == (f"could not load pipeline {broken}: missing tokenizer/, unet/ weights (*.safetensors or "
                            "*.bin); save the whole pipeline there (save_pretrained)")


def test_check_loadable_refuses_a_hub_id_neither_cached_nor_downloadable(monkeypatch):
    from huggingface_hub import constants

    from optimize.runtime.pipelines import check_loadable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError, match="not in the local Hugging Face cache and the hub is offline"):
        check_loadable(resolve_pipe("optimize-sd-tests/never-downloaded"))
    check_loadable(resolve_pipe("tiny"))  # the testbed shipped in the package: nothing to check
    check_loadable(resolve_pipe("sd1.5", random_weights=True))


def test_clip_truncation_warning_is_one_bounded_line(tiny_pipe):
    """The pipeline warns that CLIP cut a prompt past its 77th token, quoting the rest: shortened."""
    import logging

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(type(tiny_pipe).__module__)
    logger.addHandler(handler)
    try:
        generate(tiny_pipe, [" ".join(f"word{i}" for i in range(150))], 1)
    finally:
        logger.removeHandler(handler)
    (message,) = [m for m in messages if "truncated because CLIP" in m]
    assert len(message) < 400 and "\n" not in message and "characters)" in message


# --- schedulers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_runs(scheduler):
    pipe = make_pipe("tiny", scheduler)
    assert type(pipe.scheduler).__name__ == SCHEDULERS[scheduler]
    # built from the pipeline's own config: the training betas are kept
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.beta_end == pytest.approx(0.012)
    # 4, not 3: PNDM built from a config without skip_prk_steps (as tiny's) does a PRK warm-up, and in
    # that mode diffusers' PNDMScheduler.set_timesteps fails below 4 steps
    images = generate(pipe, PROMPT, 4)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_set_scheduler_changes_output(tiny_pipe):
    original = tiny_pipe.scheduler
    try:
        ddim = generate(tiny_pipe, PROMPT, 4)
        set_scheduler(tiny_pipe, "euler")
        assert type(tiny_pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        assert not np.array_equal(generate(tiny_pipe, PROMPT, 4), ddim)
    finally:
        tiny_pipe.scheduler = original


# --- offline CLIP tokenizer ----------------------------------------------------------------------
SENTENCES = [
    "a photo of a cat",
    "A man riding a bicycle down a busy city street.",
    "Two dogs, one brown & one white - playing in the PARK",
    "naïve café, 123 don't   stop\tnow",
    "a very long caption " + " ".join(f"word{i}" for i in range(100)),  # truncated at 77 tokens
]


def test_tokenizer_matches_open_clip():
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    for sentence in SENTENCES:
        expected = reference([sentence])[0].tolist()
        n = sum(1 for i in expected if i != 0)  # open_clip pads with 0
        got = tokenizer(sentence, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(got) == 77
        assert got[:n] == expected[:n], sentence
        assert all(i == tokenizer.pad_token_id for i in got[n:]), sentence


def test_tokenizer_2_same_ids_other_padding():
    # SDXL's second tokenizer pads with "!" (id 0), as the hub's does
    tokenizer_2 = clip_tokenizer(pad_token="!")
    assert tokenizer_2.pad_token_id == 0
    ids = clip_tokenizer()("a photo of a cat").input_ids
    assert tokenizer_2("a photo of a cat").input_ids == ids
