"""Intervals for the report: a paired, two-way bootstrap over seeds x corruptions.

A headline number is a statistic of paired cells: cell (c, s) holds a method's value and its
baseline's on corruption (or shift) c with stream seed s (the same split and order for both).
One bootstrap replicate draws the corruptions with replacement and, independently, the seeds
with replacement, and recomputes the statistic on the resampled grid (every drawn corruption
with every drawn seed), so both the choice of corruptions and the randomness of streams widen
the interval. The 95% interval is the 2.5 / 97.5 percentiles of BOOTSTRAP replicates
(seeded). A target counts as met only if its whole interval lies on the right side of the
threshold.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np

BOOTSTRAP = 4000
SEED = 0


def ratio_of_means(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.nanmean(a) / np.nanmean(b))


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.nanmean(a - b))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, statistic: Callable[[np.ndarray, np.ndarray], float],
                     replicates: int = BOOTSTRAP, seed: int = SEED) -> tuple[float, float, float]:
    """a, b [corruptions, seeds] (NaN: a missing cell, ignored) -> (estimate, low, high)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim == 1:
        a, b = a[None, :], b[None, :]
    if a.shape != b.shape:
        raise ValueError(f"paired cells need equal shapes, got {a.shape} and {b.shape}")
    with warnings.catch_warnings():  # all-missing cells give NaN, which is what the report shows
        warnings.simplefilter("ignore", RuntimeWarning)
        estimate = statistic(a, b)
        rng = np.random.default_rng(seed)
        nc, ns = a.shape
        reps = np.empty(replicates)
        for i in range(replicates):
            ci = rng.integers(nc, size=nc) if nc > 1 else np.zeros(1, dtype=int)
            si = rng.integers(ns, size=ns) if ns > 1 else np.zeros(1, dtype=int)
            reps[i] = statistic(a[np.ix_(ci, si)], b[np.ix_(ci, si)])
        low, high = np.nanpercentile(reps, [2.5, 97.5]) if np.isfinite(reps).any() else (np.nan, np.nan)
    return estimate, float(low), float(high)


def mean_interval(a: np.ndarray, replicates: int = BOOTSTRAP, seed: int = SEED) -> tuple[float, float, float]:
    """A mean over [corruptions, seeds] cells with the same two-way bootstrap interval."""
    a = np.asarray(a, dtype=np.float64)
    return paired_bootstrap(a, np.zeros_like(a), lambda x, _: float(np.nanmean(x)), replicates, seed)
