"""optimize.measure.evaluator: the paired timing protocol on the tiny pipeline, with scripted call times where
the numbers must be exact (which calls are timed, in which order, and which of them a speedup uses)."""

from __future__ import annotations

import gc

import numpy as np
import pytest


# --- the paired timing protocol ------------------------------------------------------------------------

def _log_calls(monkeypatch, log: list, seconds=None) -> None:
    """Log every timed call of an Evaluator as B (untouched pipeline) or C (configured); with
    ``seconds``, report its value as the call's time, without segments."""
    from optimize.measure import evaluator as measure

    original = measure.Evaluator._call

    def call(self, run, batch, index):
        images, took, segments = original(self, run, batch, index)
        log.append("C" if run is not self.pipe else "B")
        return (images, took, segments) if seconds is None else (images, seconds(), None)

    monkeypatch.setattr(measure.Evaluator, "_call", call)


def test_paired_rounds_interleave_baseline_and_configured_calls(tiny_pipe, monkeypatch):
    """With repeats, every timed configured call has a baseline call right before it, and the
    speedup comes from those rounds (not the scoring pass): on a CPU the ratio of the two sides'
    geometric means, which is the mean paired log ratio."""
    from optimize.measure import evaluator as measure
    from optimize.levers import Config, DeepCache
    from optimize.measure.metrics import ClipScorer

    settings = measure.GenerationSettings(steps=6, guidance=7.5, height=32, width=32)
    ev = measure.Evaluator(tiny_pipe, ClipScorer("tiny-clip", None), ["a red fox", "a cat", "a boat"], settings,
                           repeats=3)
    log, fake = [], iter([0.5, 0.9, 0.8, 0.7, 0.3, 1.0, 0.4, 0.6] + [0.01] * 20)  # seconds, in call order
    # fake seconds and no segments: the whole calls are the statistic
    _log_calls(monkeypatch, log, seconds=lambda: next(fake))
    m = ev.measure(Config(deepcache=DeepCache(2, 0)))
    # warm-up configured, warm-up baseline (first paired measurement only), 3 rounds, scoring pass
    assert "".join(log) == "CB" + "BC" * 3 + "CCC"
    assert m.reference.samples == [0.8, 0.3, 0.4] and m.timing.samples == [0.7, 1.0, 0.6]
    ratios = np.array([0.8, 0.3, 0.4]) / np.array([0.7, 1.0, 0.6])
    assert m.speedup == pytest.approx(np.exp(np.log(ratios).mean()))  # the fast scoring-pass calls do not count
    assert m.timing.best == pytest.approx(0.42 ** (1 / 3)) and m.timing.fastest == pytest.approx(0.6)
    assert m.timing.median == pytest.approx(0.7)

    log.clear()
    fake = iter([0.5] * 20)
    ev.measure(Config(deepcache=DeepCache(2, 0)))
    assert "".join(log) == "C" + "BC" * 3 + "CCC"  # the baseline is warm now

    log.clear()
    fake = iter([0.5] * 20)
    unpaired = ev.measure(Config(), paired=False)  # the study's baseline: no pairing
    assert "".join(log) == "CCCCCCC" and unpaired.reference is None and unpaired.speedup is None


def test_floor_takes_the_fastest_time_of_each_segment():
    """A call disturbed in one step and another disturbed in another step give the undisturbed
    time together, which neither whole call shows."""
    from optimize.measure.evaluator import Timing, floor

    calls = [[0.1, 1.0, 0.2, 0.3], [0.1, 0.2, 0.9, 0.3], [0.4, 0.2, 0.2, 0.3]]
    t = Timing.from_samples([sum(c) for c in calls], calls)
    assert t.best == pytest.approx(0.1 + 0.2 + 0.2 + 0.3)
    assert t.fastest == pytest.approx(1.1) and t.best < t.fastest
    assert floor([[0.1, 0.2], [0.1]]) is None  # calls cut differently: only whole calls compare
    assert Timing.from_samples([1.0, 0.5], [[0.5, 0.5], [0.2]]).best == 0.5


@pytest.mark.parametrize("methods", ["", "dc", "tome", "tgate", "dc+tome+tgate"])
def test_every_call_is_cut_at_each_step_and_the_cuts_add_up(tiny_pipe, methods):
    """Each timed call has steps + 1 segments (before the first UNet call, each step, the last step
    with the decode) whatever methods are on; they sum to the call's time; the hook is gone after."""
    from optimize.measure import evaluator as measure
    from optimize.levers import Config, DeepCache, TGate, ToMe
    from optimize.measure.metrics import ClipScorer

    steps = 6
    settings = measure.GenerationSettings(steps=steps, guidance=7.5, height=32, width=32)
    ev = measure.Evaluator(tiny_pipe, ClipScorer("tiny-clip", None), ["a red fox"], settings, repeats=2)
    config = Config(deepcache=DeepCache(3, 0) if "dc" in methods else None,
                    tome=ToMe(0.5, 1) if "tome" in methods else None,
                    tgate=TGate(3, 2, 1, 1) if "tgate" in methods else None)
    timed, base = ev.time(config)
    for t in (timed, base):
        assert len(t.segments) == 2 and all(len(s) == steps + 1 for s in t.segments)
        for total, cut in zip(t.samples, t.segments):
            # the cuts lie inside the call (a loaded machine may stall it just before the first cut or
            # after the last, so no closer equality is asserted) and cover most of it
            assert 0.5 * total < sum(cut) <= total + 1e-6
        assert measure.floor(t.segments) <= t.fastest + 1e-9
        assert t.best == pytest.approx(np.exp(np.log(t.samples).mean()))  # a CPU's statistic: the geometric mean
    assert not tiny_pipe.unet._forward_pre_hooks
    assert gc.isenabled()


def test_a_scored_configuration_gets_more_paired_rounds_than_a_gated_one(tiny_pipe, monkeypatch):
    """The speed gate sees the first ``repeats`` rounds; a configuration it lets through is topped up
    to ``scored_repeats`` rounds before the scoring pass, and its speedup uses all of them."""
    from optimize.measure import evaluator as measure
    from optimize.levers import Config, DeepCache
    from optimize.measure.metrics import ClipScorer

    settings = measure.GenerationSettings(steps=4, guidance=7.5, height=32, width=32)
    ev = measure.Evaluator(tiny_pipe, ClipScorer("tiny-clip", None), ["a red fox", "a cat"], settings,
                           repeats=2, scored_repeats=4)
    log = []
    _log_calls(monkeypatch, log)
    seen = []
    m = ev.measure(Config(deepcache=DeepCache(2, 0)), gate=lambda t, ref: seen.append(len(t.samples)))
    assert seen == [2]  # the gate judged the first two rounds
    assert "".join(log) == "CB" + "BC" * 4 + "CC"
    assert len(m.timing.samples) == len(m.reference.samples) == 4

    class Stop(Exception):
        pass

    def stop(t, ref):
        raise Stop

    log.clear()
    with pytest.raises(Stop):
        ev.measure(Config(deepcache=DeepCache(3, 0)), gate=stop)
    assert "".join(log) == "C" + "BC" * 2  # gated: no top-up, no scoring pass
    assert not tiny_pipe.unet._forward_pre_hooks


def test_default_rounds_follow_the_device_and_the_mode():
    """Every device times in paired rounds, the CPU too (docs/benchmarks.md, "CPU timing"): a scored
    configuration gets more rounds than the speed gate judges, and enough for an interval."""
    from optimize.measure.evaluator import default_rounds

    gate, scored = default_rounds("cpu", "eager")
    assert 1 <= gate < scored and scored >= 2
    assert default_rounds("cuda", "eager") == (3, 10)
    assert default_rounds("cuda:1", "graphs") == (3, 5) == default_rounds("cuda", "compile")
