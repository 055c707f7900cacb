"""Uncertainty of evaluation numbers, each checked in ``tests/test_stats.py``:

    binomial_se          standard error of a rate (a share of n independent yes / no outcomes), Agresti-Coull
                         adjusted so that 0 / n and n / n keep a spread
    mean_of_rates_se     standard error of the unweighted mean of k independent rates: sqrt(sum_i se_i^2) / k
    bootstrap_samples    a statistic on seeded bootstrap resamples of one or more arrays (rows drawn with
                         replacement, paired across arrays or each array on its own)
    bootstrap_interval   the percentile interval of those
    welch_t_test         Welch's unequal-variance t-test of two independent samples (two-sided p from scipy's t)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def binomial_se(p: float, n: int) -> float | None:
    """Standard error of a rate ``p`` measured on ``n`` independent items, Agresti-Coull adjusted: the Wald formula
    at p~ = (x + 2) / (n + 4) over n + 4 items (x = p n successes). Near 0.5 it is the plain sqrt(p (1 - p) / n); at 0
    or 1 it stays above 0 (0 passes of 38 is not a certainty), where the plain formula says 0. None when n = 0."""
    if n <= 0:
        return None
    p_adj = (p * n + 2.0) / (n + 4.0)
    return math.sqrt(p_adj * (1.0 - p_adj) / (n + 4.0))


def mean_of_rates_se(rates_and_ns: Sequence[tuple[float, int]]) -> float | None:
    """Standard error of the unweighted mean of independent rates given as (rate, n) pairs: the rates' binomial
    variances add and the mean divides by k, so sqrt(sum se_i^2) / k. None if there is no rate or one has n == 0."""
    ses = [binomial_se(p, n) for p, n in rates_and_ns]
    if not ses or any(se is None for se in ses):
        return None
    return math.sqrt(sum(se * se for se in ses)) / len(ses)


def bootstrap_samples(fn: Callable[..., float], *arrays: np.ndarray, n_boot: int, seed: int,
                      paired: bool = True) -> np.ndarray:
    """``fn`` on ``n_boot`` bootstrap resamples of the arrays [n_boot]: rows (first axis) drawn with replacement.
    ``paired``: one set of row indices for all arrays (they must have the same length; rows belong together); else
    each array is resampled on its own (independent samples, e.g. generated vs real features)."""
    if not arrays or n_boot < 1:
        raise ValueError("bootstrap needs an array and n_boot >= 1")
    arrs = [np.asarray(a) for a in arrays]
    lengths = [len(a) for a in arrs]
    if min(lengths) < 1 or (paired and len(set(lengths)) > 1):
        raise ValueError(f"bootstrap: row counts {lengths} (paired needs equal, non-empty arrays)")
    rng = np.random.default_rng(seed)
    stats_B = np.empty(n_boot)
    for b in range(n_boot):
        if paired:
            idx = rng.integers(0, lengths[0], lengths[0])
            stats_B[b] = fn(*(a[idx] for a in arrs))
        else:
            stats_B[b] = fn(*(a[rng.integers(0, len(a), len(a))] for a in arrs))
    return stats_B


def bootstrap_interval(fn: Callable[..., float], *arrays: np.ndarray, n_boot: int, level: float = 0.95, seed: int,
                       paired: bool = True) -> tuple[float, float]:
    """Percentile bootstrap interval of ``fn(*arrays)``: the (1 - level) / 2 and (1 + level) / 2 quantiles of
    ``bootstrap_samples`` (same ``paired`` meaning)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    stats_B = bootstrap_samples(fn, *arrays, n_boot=n_boot, seed=seed, paired=paired)
    lo, hi = np.quantile(stats_B, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's t-test of mean(a) == mean(b) for independent samples with unequal variances: (t, degrees of freedom
    by Welch-Satterthwaite, two-sided p). Both samples need >= 2 values. With no variance in either sample the test
    degenerates: p = 1 if the means are equal, else 0 (t = +-inf, df NaN)."""
    from scipy.stats import t as t_dist

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("welch_t_test needs at least 2 values per sample")
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    diff = float(x.mean() - y.mean())
    if va + vb == 0:
        return (0.0, float("nan"), 1.0) if diff == 0 else (math.copysign(math.inf, diff), float("nan"), 0.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1))
    return float(t), float(df), float(2 * t_dist.sf(abs(t), df))
