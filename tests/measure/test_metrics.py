"""optimize.measure.metrics: the CLIP score on the tiny pipeline and the relative score loss (fidelity against
the baseline images is in tests/measure/test_fidelity.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimize.measure.metrics import ClipScorer, MetricError, score_loss


def test_clip_score_tiny(tiny_pipe):
    prompts = ["a red fox in the snow", "two cats on a red couch", "a bowl of fresh fruit"]
    images = tiny_pipe(prompts, num_inference_steps=4, output_type="pil",
                       generator=torch.Generator("cpu").manual_seed(0)).images
    scorer = ClipScorer("tiny-clip", None)
    scores = scorer.score(images, prompts)
    assert scores.shape == (3,) and (scores > 0).all() and (scores <= 100).all()
    again = ClipScorer("tiny-clip", None).score(images, prompts)
    assert np.array_equal(scores, again), "two instances of the tiny scorer disagree"
    # scores depend on the pairing, not only on the images
    assert not np.array_equal(scorer.score(images, prompts[::-1]), scores)
    with pytest.raises(ValueError):
        scorer.score(images, prompts[:2])


def test_score_loss():
    assert score_loss(10, 9) == pytest.approx(0.1)
    assert score_loss(20, 20) == 0
    assert score_loss(10, 11) == pytest.approx(-0.1)
    for base in (0, 0.0, -1.0, float("nan")):
        with pytest.raises(MetricError, match="baseline CLIP score"):
            score_loss(base, 5.0)
