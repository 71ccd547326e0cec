"""Bootstrap confidence intervals of a mean (accuracy is the mean of 0/1 hits)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean and its confidence interval; ``low``/``high`` are None for fewer than two values."""

    mean: float
    low: float | None
    high: float | None


def mean_interval(values, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Mean of ``values`` (n,) with a percentile bootstrap interval (``scipy.stats.bootstrap``).

    The percentile method stays defined when every value is equal (an accuracy of 0 or 1),
    where BCa is not; the interval is then that value. The resampling is seeded, so the
    same values always give the same interval.
    """
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"mean_interval needs a non-empty 1-D array of values, got shape {x.shape}")
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, None, None)
    if np.all(x == x[0]):
        return Interval(mean, mean, mean)
    ci = bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                   vectorized=True, rng=np.random.default_rng(seed)).confidence_interval
    return Interval(mean, float(ci.low), float(ci.high))


def difference_interval(a, b, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """``mean(a) - mean(b)`` for paired values ``a``, ``b`` (n,) (two methods on the same rows),
    with a percentile bootstrap interval that resamples rows, keeping each pair together."""
    from scipy.stats import bootstrap

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 1 or x.shape != y.shape or len(x) == 0:
        raise ValueError(f"difference_interval needs two non-empty 1-D arrays of one length, got {x.shape} and {y.shape}")
    mean = float(x.mean() - y.mean())
    if len(x) < 2:
        return Interval(mean, None, None)
    if np.all(x - y == (x - y)[0]):
        return Interval(mean, mean, mean)
    ci = bootstrap((x, y), lambda u, v, axis: u.mean(axis) - v.mean(axis), paired=True, n_resamples=n_resamples,
                   confidence_level=confidence, method="percentile", vectorized=True,
                   rng=np.random.default_rng(seed)).confidence_interval
    return Interval(mean, float(ci.low), float(ci.high))
