"""Uncertainty helpers (``transfusion/eval/stats.py``) against known values, scipy and simulation; the synergy
report's verdict rule (``tools/synergy.py``): Welch's t-test at 0.05 with at least 5 seeds per arm."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from transfusion.eval.stats import (
    binomial_se,
    bootstrap_interval,
    bootstrap_samples,
    mean_of_rates_se,
    welch_t_test,
)

REPO = Path(__file__).resolve().parents[1]


def test_binomial_se_known_values():
    assert binomial_se(0.5, 100) == pytest.approx(math.sqrt(0.25 / 104))  # ~ the Wald 0.05
    assert binomial_se(0.1, 900) == pytest.approx(0.01, rel=0.01)
    # 0 of 50 is not a certainty: p~ = 2 / 54 over 54 items (the Wald formula would say 0)
    assert binomial_se(0.0, 50) == pytest.approx(math.sqrt(2 / 54 * 52 / 54 / 54)) == binomial_se(1.0, 50)
    assert binomial_se(0.5, 0) is None


def test_binomial_se_covers_a_rare_rate():
    """p = 0.02, n = 40: most draws see 0 or 1 passes, where the Wald interval (se 0 at 0 passes) misses p; the
    adjusted one covers it at least 90 % of the time."""
    rng = np.random.default_rng(5)
    p, n, trials = 0.02, 40, 400
    covered = wald = 0
    for _ in range(trials):
        x = (rng.random(n) < p).mean()
        covered += abs(x - p) <= 1.96 * binomial_se(x, n)
        wald += abs(x - p) <= 1.96 * math.sqrt(x * (1 - x) / n)
    assert covered / trials >= 0.9 and wald / trials < 0.7


def test_mean_of_rates_se_known_value_and_simulation():
    assert mean_of_rates_se([(0.5, 100), (0.5, 100)]) == pytest.approx(math.sqrt(2) * binomial_se(0.5, 100) / 2)
    assert mean_of_rates_se([(0.3, 40)]) == pytest.approx(binomial_se(0.3, 40))
    assert mean_of_rates_se([(0.5, 10), (0.2, 0)]) is None and mean_of_rates_se([]) is None
    # the spread of the mean of three independent binomial rates over 20,000 draws (the adjusted standard errors
    # run ~4 % above the true spread here, from the rate at 0.9 on 30 items)
    rng = np.random.default_rng(0)
    ps, ns = np.array([0.2, 0.5, 0.9]), np.array([50, 120, 30])
    means = (rng.binomial(ns, ps, size=(20_000, 3)) / ns).mean(1)
    assert float(means.std()) == pytest.approx(mean_of_rates_se(list(zip(ps, ns))), rel=0.06)


def test_bootstrap_interval_of_a_mean_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    x = rng.normal(loc=2.0, scale=3.0, size=400)
    lo, hi = bootstrap_interval(np.mean, x, n_boot=2000, seed=0)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.1 * half) and hi == pytest.approx(x.mean() + half, abs=0.1 * half)
    assert bootstrap_interval(np.mean, x, n_boot=2000, seed=0) == (lo, hi)  # seeded
    assert bootstrap_interval(np.mean, x, n_boot=2000, seed=1) != (lo, hi)
    narrow = bootstrap_interval(np.mean, x, n_boot=2000, level=0.5, seed=0)
    assert lo < narrow[0] < narrow[1] < hi


def test_bootstrap_paired_and_independent_resampling():
    x = np.arange(50.0)
    # paired rows keep x - y at 1 in every resample; independent resamples do not
    paired = bootstrap_samples(lambda a, b: float(np.mean(a - b)), x + 1, x, n_boot=50, seed=0)
    assert np.allclose(paired, 1.0)
    indep = bootstrap_samples(lambda a, b: float(np.mean(a - b)), x + 1, x, n_boot=50, seed=0, paired=False)
    assert indep.std() > 1.0
    unequal = bootstrap_samples(lambda a, b: float(len(a) - len(b)), x, x[:10], n_boot=5, seed=0, paired=False)
    assert np.all(unequal == 40)  # each array keeps its own length
    with pytest.raises(ValueError):
        bootstrap_samples(np.mean, x, x[:10], n_boot=5, seed=0)


def test_bootstrap_and_binomial_intervals_cover_a_simulated_rate():
    """200 simulated rates (p = 0.3, n = 80): the 95% percentile bootstrap and p +- 1.96 se each cover the true p
    about 95% of the time (200 trials: the 0.88 to 0.99 band is > 3 binomial standard deviations wide)."""
    rng = np.random.default_rng(2)
    p, n, trials = 0.3, 80, 200
    boot = wald = 0
    for t in range(trials):
        x = (rng.random(n) < p).astype(float)
        lo, hi = bootstrap_interval(np.mean, x, n_boot=300, seed=t)
        boot += lo <= p <= hi
        se = binomial_se(x.mean(), n)
        wald += abs(x.mean() - p) <= 1.96 * se
    assert 0.88 <= boot / trials <= 0.99 and 0.88 <= wald / trials <= 0.99


def test_welch_t_test_matches_scipy():
    from scipy.stats import ttest_ind

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=7), rng.normal(loc=1.0, scale=3.0, size=5)
    t, df, p = welch_t_test(a, b)
    ref = ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic, rel=1e-10) and p == pytest.approx(ref.pvalue, rel=1e-10)
    va, vb = a.var(ddof=1) / 7, b.var(ddof=1) / 5
    assert df == pytest.approx((va + vb) ** 2 / (va ** 2 / 6 + vb ** 2 / 4))
    assert welch_t_test([0.0, 0.0], [0.0, 0.0])[2] == 1.0  # no variance, equal means
    assert welch_t_test([1.0, 1.0], [0.0, 0.0])[2] == 0.0  # no variance, different means
    with pytest.raises(ValueError):
        welch_t_test([1.0], [1.0, 2.0])


@pytest.fixture(scope="module")
def synergy():
    spec = importlib.util.spec_from_file_location("synergy_tool", REPO / "tools" / "synergy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synergy_verdict_needs_five_seeds_and_a_significant_welch_test(synergy):
    rng = np.random.default_rng(4)
    spec = list(0.50 + 0.01 * rng.normal(size=5))
    joint = list(0.60 + 0.01 * rng.normal(size=5))
    v, mean, se = synergy.verdict(joint, spec, higher=True)
    assert v.startswith("yes") and mean == pytest.approx(np.mean(joint) - np.mean(spec)) and 0 < se < 0.02
    assert synergy.verdict(spec, joint, higher=True)[0].startswith("no: specialist better")
    v, mean, _ = synergy.verdict(joint, spec, higher=False)  # a loss: the joint run's higher value is worse
    assert v.startswith("no: specialist better") and mean < 0
    # the old rule called "yes" here (ahead on both seeds by more than the spread); 2 seeds decide nothing now
    assert synergy.verdict(joint[:2], spec[:2], higher=True)[0].startswith("undetermined (2 seeds < 5")
    assert synergy.verdict(joint[:1], spec[:1], higher=True)[0].startswith("undetermined (1 seed < 5")
    # pure noise with equal means: no call at 0.05 for these draws
    noise_j, noise_s = list(rng.normal(size=5)), list(rng.normal(size=5))
    v, _, _ = synergy.verdict(noise_j, noise_s, higher=True)
    p = welch_t_test(noise_j, noise_s)[2]
    assert p >= 0.05 and v == f"no (not significant, p = {p:.3f})"


def test_synergy_redoes_runs_of_an_older_report_version(synergy):
    """A saved report of an earlier version (its numbers meant other things) is not reused."""
    from transfusion.eval.compositional import REPORT_VERSION

    assert synergy.current_report({"report_version": REPORT_VERSION})
    assert not synergy.current_report({"world": 3}) and not synergy.current_report({"report_version": 2})
