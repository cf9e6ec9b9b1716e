"""The scoring pass in batches (optimize.measure.evaluator's ``score_batch``): each prompt keeps its own
seed, the untouched pipeline scored in batches matches its baseline scored the same way exactly, the
timed calls stay at the study's batch size, and every measurement records what its time went on."""

from __future__ import annotations

import numpy as np
import pytest
from fakegraphs import FakeBackend

from optimize.levers import Config, DeepCache
from optimize.measure.evaluator import Evaluator, GenerationSettings, default_score_batch
from optimize.measure.metrics import ClipScorer, FidelityScorer, score_loss
from optimize.study.record import PSNR_CAP

PROMPTS = ["a red fox", "a cat", "a boat", "a green tree", "a blue car"]
SETTINGS = GenerationSettings(steps=4, guidance=7.5, height=32, width=32)


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer("tiny-clip", None)


def _evaluator(pipe, scorer, score_batch, **kwargs) -> Evaluator:
    return Evaluator(pipe, scorer, PROMPTS, kwargs.pop("settings", SETTINGS), score_batch=score_batch, **kwargs)


def _pixels(m) -> np.ndarray:
    return np.stack([np.asarray(im) for im in m.images]).astype(int)


def test_scoring_calls_seed_each_prompt_by_its_index(tiny_pipe, scorer):
    batched = _evaluator(tiny_pipe, scorer, 2).scoring_calls()
    assert batched == [(PROMPTS[0:2], [0, 1]), (PROMPTS[2:4], [2, 3]), (PROMPTS[4:], [4])]
    assert _evaluator(tiny_pipe, scorer, 8).scoring_calls() == [(PROMPTS, [0, 1, 2, 3, 4])]
    # a study from before: calls of its batch size, one generator per call
    legacy = _evaluator(tiny_pipe, scorer, None, settings=GenerationSettings(4, 7.5, 32, 32, batch_size=2))
    assert legacy.scoring_calls() == [(PROMPTS[0:2], 0), (PROMPTS[2:4], 1), (PROMPTS[4:], 2)]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="score_batch"):
            _evaluator(tiny_pipe, scorer, bad)


def test_the_untouched_pipeline_scored_in_batches_matches_its_batched_baseline(tiny_pipe, scorer):
    """The study's baseline and a trial of the untouched configuration, both scored 3 prompts per call
    (a short last call of 2): the same images, loss 0, PSNR at its cap, SSIM 1 (torchmetrics' own
    rounding gives an image 0.9999 against itself at times)."""
    baseline = _evaluator(tiny_pipe, scorer, 3, repeats=1).measure(Config(), paired=False)
    trial = _evaluator(tiny_pipe, scorer, 3, repeats=1).measure(Config())  # paired, as a trial
    np.testing.assert_array_equal(_pixels(trial), _pixels(baseline))
    assert score_loss(baseline.clip_score, trial.clip_score) == 0.0
    fidelity = FidelityScorer(baseline.images).per_image(trial.images)
    assert list(fidelity["psnr"]) == [PSNR_CAP] * len(PROMPTS)
    assert list(fidelity["ssim"]) == pytest.approx([1.0] * len(PROMPTS), abs=1e-3)


def test_each_image_keeps_its_prompts_seed_whatever_the_batch(tiny_pipe, scorer):
    """Prompt i is generated from seed + i at any scoring batch: its image is the batch-1 image up to
    the rounding of batched kernels (at most one 8-bit level here), where a shared or shifted seed
    would give another picture. The batch-1 scoring is bit for bit what studies made before scored."""
    one = _evaluator(tiny_pipe, scorer, 1, repeats=0).measure(Config(), paired=False)
    legacy = _evaluator(tiny_pipe, scorer, None, repeats=0).measure(Config(), paired=False)
    np.testing.assert_array_equal(_pixels(legacy), _pixels(one))
    for batch in (2, 5):
        m = _evaluator(tiny_pipe, scorer, batch, repeats=0).measure(Config(), paired=False)
        assert np.abs(_pixels(m) - _pixels(one)).max() <= 2, batch
        assert min(FidelityScorer(one.images).per_image(m.images)["psnr"]) > 60, batch
    shifted = _evaluator(tiny_pipe, scorer, 5, repeats=0, settings=GenerationSettings(4, 7.5, 32, 32, seed=43))
    assert min(FidelityScorer(one.images).per_image(shifted.measure(Config(), paired=False).images)["psnr"]) < 40


def test_timed_calls_stay_at_the_study_batch_size(tiny_pipe, scorer, monkeypatch):
    """Paired rounds and warm-ups call the first ``batch_size`` prompts; only the scoring pass runs in
    batches of ``score_batch``, and its calls of another size never count as the baseline's time."""
    from optimize.measure import evaluator as measure

    sizes = []
    original = measure.Evaluator._call

    def call(self, run, batch, offset):
        sizes.append(len(batch))
        return original(self, run, batch, offset)

    monkeypatch.setattr(measure.Evaluator, "_call", call)
    ev = _evaluator(tiny_pipe, scorer, 3, repeats=2)
    m = ev.measure(Config(deepcache=DeepCache(2, 0)))
    assert sizes == [1, 1] + [1, 1] * 2 + [3, 2]  # warm-ups, two paired rounds, the scoring pass
    assert len(m.timing.samples) == len(m.reference.samples) == 2
    sizes.clear()
    unpaired = ev.measure(Config(), paired=False)  # the study's baseline: its own timed calls only
    assert sizes == [1, 1, 1, 3, 2] and len(unpaired.timing.samples) == 2


def test_a_measurement_records_its_parts_and_what_levers_report(tiny_pipe, scorer, monkeypatch):
    """Wall seconds of the timing rounds, the scoring pass, CLIP and applying; a lever's own
    ``seconds`` (a compile, say) summed over its applications (eager: one per call context); the
    timing part alone when the speed gate stops the measurement."""
    from optimize.levers import deepcache

    monkeypatch.setattr(deepcache._Applied, "seconds", {"compile": 0.25}, raising=False)
    ev = _evaluator(tiny_pipe, scorer, 5, repeats=1)
    m = ev.measure(Config(deepcache=DeepCache(2, 0)))
    assert set(m.parts) == {"timing", "generation", "clip", "apply", "compile"} and m.parts == ev.parts
    assert m.parts["compile"] == pytest.approx(3 * 0.25)  # the warm-up's, the round's and the scoring pass's
    assert all(v > 0 for v in m.parts.values())

    def gate(timing, reference):
        raise RuntimeError("too slow")

    with pytest.raises(RuntimeError, match="too slow"):
        ev.measure(Config(deepcache=DeepCache(3, 0)), gate=gate)
    assert set(ev.parts) == {"timing", "apply", "compile"}


def test_graph_modes_capture_the_scoring_shape_once_and_record_it(tiny_pipe):
    """In a graph mode the scoring batch is one more capture per step kind, a short last batch one
    more; their seconds are the ``capture`` part."""
    class Ones:
        def score(self, images, prompts):
            return np.ones(len(images))

    settings = GenerationSettings(steps=4, guidance=7.5, height=64, width=64)
    counts = {}
    for prompts in (4, 5):  # scored 3 + 1 (the timed calls' shape) and 3 + 2 (a shape of its own)
        backend = FakeBackend()
        ev = Evaluator(tiny_pipe, Ones(), PROMPTS[:prompts], settings, repeats=1, exec="graphs",
                       graph_backend=backend, score_batch=3)
        try:
            m = ev.measure(Config(deepcache=DeepCache(2, 0)))
        finally:
            ev.close()
        counts[prompts] = backend.captures
        assert m.parts["capture"] > 0
    # the configuration's two kinds (full, cached step) at batches 1 and 3, and at 2 for 5 prompts;
    # the baseline's one kind at batch 1; the text encoder at batches 1 and 3 (and 2)
    assert counts == {4: 2 * 2 + 1 + 2, 5: 2 * 3 + 1 + 3}


@pytest.mark.parametrize("device,size,batch", [("cuda", 512, 8), ("cuda:1", 768, 2), ("cuda", 1024, 2),
                                               ("cuda", 2048, 1), ("cpu", 64, 8)])
def test_default_score_batch(device, size, batch):
    assert default_score_batch(device, size, size) == batch
