"""optimize.measure.uncertainty on its own: the paired intervals against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from optimize.measure.uncertainty import intervals, mean_interval, score_loss_interval, speedup_interval, t_quantile


def test_t_quantile_is_students():
    assert t_quantile(0.9, 4) == pytest.approx(stats.t.ppf(0.95, 4))
    assert t_quantile(0.95, 30) == pytest.approx(stats.t.ppf(0.975, 30))


def test_mean_interval_is_the_t_interval_of_the_mean():
    lo, hi = mean_interval([1.0, 2.0, 3.0], 0.9)
    half = stats.t.ppf(0.95, 2) * 1.0 / math.sqrt(3)
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))
    assert mean_interval([5.0], 0.9) is None  # one value has no spread


def test_score_loss_interval_is_paired():
    base = np.array([30.0, 20.0, 25.0, 35.0])
    # a loss of exactly 10% on every prompt: no uncertainty, however different the prompts are
    assert score_loss_interval(base, 0.9 * base, 0.9) == pytest.approx((0.1, 0.1))
    # the same per-prompt noise shifted onto the baseline side changes the centre, not the pairing
    noisy = 0.9 * base + np.array([0.5, -0.5, 0.5, -0.5])
    lo, hi = score_loss_interval(base, noisy, 0.9)
    assert lo < 1 - noisy.mean() / base.mean() < hi and hi - lo < 0.05
    assert score_loss_interval([0.0, 0.0], [1.0, 1.0], 0.9) is None  # a zero baseline is no ratio
    assert score_loss_interval([1.0], [1.0], 0.9) is None


def test_speedup_interval_paired_and_unpaired():
    base = [1.0, 1.1, 0.9, 1.2]
    timed = [b / 2 for b in base]  # every round exactly twice as fast: the paired interval has no width
    assert speedup_interval(2.0, timed, base, True, 0.9) == pytest.approx((2.0, 2.0))
    lo, hi = speedup_interval(2.0, timed, base, False, 0.9)  # unpaired, the calls' spread shows
    assert lo < 2.0 < hi
    assert speedup_interval(2.0, timed[:3], base, True, 0.9) is None  # rounds must pair up
    assert speedup_interval(2.0, [0.5], [1.0], True, 0.9) is None


def test_intervals_collects_what_has_one():
    out = intervals(0.9, [30.0, 31.0, 29.0], [29.0, 30.5, 28.0], {"psnr": [30.0, 32.0, 31.0]}, 2.0,
                    [0.5, 0.52, 0.49], [1.0, 1.01, 0.99], True)
    assert out["level"] == 0.9 and out["n"] == 3
    assert set(out) == {"level", "n", "score_loss", "psnr", "speedup"}
    assert out["psnr"][0] < 31.0 < out["psnr"][1]
