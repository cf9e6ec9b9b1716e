"""How sure a trial's numbers are: paired intervals for its losses and for its speedup (docs/trust.md).

A trial and the baseline are generated from the same prompts with the same seeds, so every loss is a
*paired* comparison and its interval is a paired t interval over the prompts:

* relative CLIP score loss ``L = 1 - S/B`` (``S``, ``B``: the trial's and the baseline's mean scores):
  a ratio, so its standard error is the delta method's, ``sd(s_i - (S/B) b_i) / (B sqrt(n))``: the
  spread of each prompt's score around what the baseline's score of the same prompt predicts. What
  varies from prompt to prompt in both (one prompt is simply harder) cancels;
* PSNR, SSIM, LPIPS: already one value per prompt against the baseline image of the same prompt and
  seed, so the interval of their mean;
* speedup: from the timed calls. With paired rounds (a baseline call, then a configured call; every
  trial on every device) the interval of the mean log ratio of the rounds; for two unpaired sets of
  calls Welch's interval of the difference of the two sides' mean log times. The point estimate stays the floor ratio
  (:mod:`optimize.measure.evaluator`); the interval is put around it, on the log scale, with the half-width the
  calls' spread gives: it says how much the number could move in another set of calls.

Every interval is two-sided at ``level`` (0.9: 5% on each side) with Student's t quantile at n - 1
degrees of freedom, so it is honest for the handful of prompts a study scores (2 prompts give a wide
interval, not a falsely narrow one). Fewer than 2 values give no interval (None).

Example:
    >>> lo, hi = mean_interval([0.1, 0.2, 0.3], 0.9)
    >>> round(lo, 4), round(hi, 4)
    (0.0314, 0.3686)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..study.record import INTERVAL_LEVEL, INTERVAL_N, SCORE_LOSS, SPEEDUP

Interval = tuple[float, float]


def t_quantile(level: float, df: float) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf((1 + level) / 2, df))


def _around(center: float, half: float) -> Interval:
    return float(center - half), float(center + half)


def mean_interval(values: Sequence[float], level: float) -> Interval | None:
    """t interval of the mean of ``values`` (None for fewer than 2)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    return _around(x.mean(), t_quantile(level, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def score_loss_interval(base: Sequence[float], scores: Sequence[float], level: float) -> Interval | None:
    """Paired interval of the relative score loss ``1 - mean(scores) / mean(base)`` (module docstring);
    ``base[i]`` and ``scores[i]`` come from the same prompt and seed. None for fewer than 2 pairs or a
    baseline whose mean is not positive."""
    b, s = np.asarray(base, dtype=float), np.asarray(scores, dtype=float)
    if b.shape != s.shape or b.size < 2 or not b.mean() > 0:
        return None
    ratio = s.mean() / b.mean()
    se = (s - ratio * b).std(ddof=1) / (b.mean() * math.sqrt(b.size))
    return _around(1 - ratio, t_quantile(level, b.size - 1) * se)


def speedup_interval(speedup: float, timed: Sequence[float], base: Sequence[float], paired: bool,
                     level: float) -> Interval | None:
    """Interval of ``speedup`` from the per-call times of the configured side (``timed``) and of the
    baseline calls it was divided by (``base``): paired rounds (``paired``, the same count, in round
    order) or two independent sets. None with fewer than 2 calls on a side."""
    c, b = np.log(np.asarray(timed, dtype=float)), np.log(np.asarray(base, dtype=float))
    if c.size < 2 or b.size < 2 or (paired and c.size != b.size):
        return None
    if paired:
        d = b - c
        half = t_quantile(level, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    else:
        vc, vb = c.var(ddof=1) / c.size, b.var(ddof=1) / b.size
        if vc + vb == 0:
            half = 0.0
        else:  # Welch-Satterthwaite degrees of freedom
            df = (vc + vb) ** 2 / (vc ** 2 / (c.size - 1) + vb ** 2 / (b.size - 1))
            half = t_quantile(level, df) * math.sqrt(vc + vb)
    return float(speedup * math.exp(-half)), float(speedup * math.exp(half))


def intervals(level: float, base_scores, scores, fidelity: dict[str, Sequence[float]], speedup: float,
              timed: Sequence[float], base_times: Sequence[float], paired: bool) -> dict:
    """A trial's :data:`optimize.study.record.INTERVALS`: the level, the number of prompts and an interval per
    attr that has one (score_loss; each fidelity metric, in its own units; speedup)."""
    out: dict = {INTERVAL_LEVEL: level, INTERVAL_N: len(scores)}
    found = {SCORE_LOSS: score_loss_interval(base_scores, scores, level)}
    found.update({k: mean_interval(v, level) for k, v in fidelity.items()})
    found[SPEEDUP] = speedup_interval(speedup, timed, base_times, paired, level)
    out.update({k: [v[0], v[1]] for k, v in found.items() if v is not None and all(map(math.isfinite, v))})
    return out
