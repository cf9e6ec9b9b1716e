"""optimize.runtime.testbed's synthetic world: deterministic captions, a held-out split of colour-shape pairs
never seen in training, captions that parse back to their scenes, renders that show their colour."""

from __future__ import annotations

import pytest

from optimize import testbed
from optimize.runtime.testbed import world
from optimize.measure.metrics import testbed_scorer as load_testbed_scorer  # not named test*: pytest would collect it


def test_world_round_trip_and_split():
    train, held = testbed.captions("train"), testbed.captions("heldout")
    assert (len(train), len(held)) == (2016, 288) and not set(train) & set(held)
    assert testbed.captions("train") == train  # deterministic
    for caption in train[:50] + held[:50]:
        assert world.parse(caption).caption == caption
        assert world.colour_of(testbed.render(caption)) == world.parse(caption).colour
    pairs = {(world.parse(c).colour, world.parse(c).shape) for c in train}
    assert not pairs & set(world.HELDOUT_PAIRS)
    assert {(world.parse(c).colour, world.parse(c).shape) for c in held} <= set(world.HELDOUT_PAIRS)
    assert testbed.render(held[0]).size == (64, 64)
    with pytest.raises(ValueError):
        testbed.render("a photo of a cat")


def test_missing_weights_are_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(testbed, "WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="testbed pipeline is missing"):
        testbed.pipeline_dir()
    with pytest.raises(FileNotFoundError, match="testbed CLIP weights are missing"):
        load_testbed_scorer()
