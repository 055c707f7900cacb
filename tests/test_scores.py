"""Metric math against independent references: FID / KID against float64 numpy / scipy computations, BLEU / CIDEr
against pycocoevalcap's scorers (installed by `make install`), bits per caption."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from transfusion.eval.scores import (
    bits_per_caption,
    bleu,
    cider,
    feature_scores,
    fid_with_interval,
    frechet_distance,
    kernel_inception_distance,
    kid_subset_size,
)
from transfusion.eval.scores import _fid_from_grams, _grams


def test_frechet_distance_matches_scipy_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(loc=0.3, size=(250, 16)) @ rng.normal(size=(16, 16))
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert abs(frechet_distance(a, a)) < 1e-8  # a set against itself
    assert frechet_distance(a, b) > 1.0


def _poly_mmd2(a, b):
    """Unbiased MMD^2 with the cubic kernel over whole sets, written out in plain Python (independent of scores)."""
    d = a.shape[1]

    def k(x, y):
        return (sum(float(xi) * float(yi) for xi, yi in zip(x, y)) / d + 1) ** 3

    m, n = len(a), len(b)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_direct_unbiased_mmd():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 8)), rng.normal(loc=0.5, size=(40, 8))
    mean, _ = kernel_inception_distance(a, b, subsets=3, subset_size=len(a))  # a full subset is a permutation
    assert mean == pytest.approx(_poly_mmd2(a, b), rel=1e-9)
    same, _ = kernel_inception_distance(a, rng.normal(size=(40, 8)), subsets=50, subset_size=20)
    assert abs(same) < mean  # unbiased: near zero for one distribution


def test_kid_default_subsets_have_a_spread_and_average_to_the_full_set():
    """n = 100: subsets of 50 (not the whole set, whose std over subsets is 0 whatever the data). Their mean
    estimates the full-set unbiased MMD^2 (each subset's value is unbiased for it given the data); the 100 subsets
    are independent draws, so the mean is within a few std / sqrt(100) of it: 5 of those (a 1-in-10^6 miss)."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(100, 6)), rng.normal(loc=0.4, scale=1.2, size=(100, 6))
    assert kid_subset_size(100) == 50 and kid_subset_size(3) == 2 and kid_subset_size(5000) == 1000
    mean, std = kernel_inception_distance(a, b)
    full = _poly_mmd2(a, b)
    assert std > 0.01 * abs(full)
    assert abs(mean - full) < 5 * std / math.sqrt(100)


def test_kid_precomputed_kernels_equal_per_subset_kernels(monkeypatch):
    from transfusion.eval import scores

    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(30, 5)), rng.normal(size=(24, 5))
    fast = kernel_inception_distance(a, b, subsets=7, seed=2)
    monkeypatch.setattr(scores, "_KID_KERNEL_MAX_ROWS", 0)  # every subset's kernels from its features
    assert kernel_inception_distance(a, b, subsets=7, seed=2) == pytest.approx(fast, rel=1e-12)


@pytest.mark.parametrize("n_a,n_b,d", [(40, 30, 96), (150, 120, 24)])
def test_frechet_gram_path_equals_the_covariance_path(n_a, n_b, d):
    """tr (S1 S2)^1/2 as the nuclear norm of the n x n matrix A B^T equals the d x d eigen-decomposition route, with
    fewer and with more rows than dimensions (features offset and nonnegative like Inception's)."""
    rng = np.random.default_rng(n_a)
    a = np.abs(rng.normal(size=(n_a, d)) @ rng.normal(size=(d, d))) + 3.0
    b = np.abs(rng.normal(loc=0.2, size=(n_b, d)) @ rng.normal(size=(d, d)))
    ref = frechet_distance(a, b, method="eigh")
    assert frechet_distance(a, b, method="gram") == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert abs(frechet_distance(a, a, method="gram")) < 1e-8 * ref
    # a bootstrap resample as distinct rows with counts (what fid_with_interval computes) = its duplicated rows
    i, j = rng.integers(0, n_a, n_a), rng.integers(0, n_b, n_b)
    (ui, wi), (uj, wj) = np.unique(i, return_counts=True), np.unique(j, return_counts=True)
    kaa, kbb, kab = _grams(a, b)
    weighted = _fid_from_grams(kaa[np.ix_(ui, ui)], kbb[np.ix_(uj, uj)], kab[np.ix_(ui, uj)], wi, wj)
    assert weighted == pytest.approx(frechet_distance(a[i], b[j], method="eigh"), rel=1e-6)


def test_fid_interval_holds_the_estimate_and_the_sampling_spread():
    """Fewer rows than dimensions (the n = 100 x 2048 case, scaled down): duplicated rows inflate a resample's FID,
    so the raw percentile interval misses the estimate; the returned one is centred on it. Its width is compared
    with the spread of FID over 150 fresh draws of the same distributions (the width it estimates)."""
    rng = np.random.default_rng(5)
    n, d = 40, 64
    mix = rng.normal(size=(d, d)) / math.sqrt(d)

    def draw(loc):
        return np.abs(rng.normal(loc=loc, size=(n, d)) @ mix)

    gen, real = draw(0.3), draw(0.0)
    out = fid_with_interval(gen, real, n_boot=200, seed=0)
    assert out["fid"] == pytest.approx(frechet_distance(gen, real), rel=1e-12) and out["n"] == n
    assert out["fid_lo"] < out["fid"] < out["fid_hi"] and out["fid_boot_bias"] > 0
    assert out["fid_lo"] + out["fid_boot_bias"] > out["fid"]  # the unshifted interval lies above the estimate
    assert fid_with_interval(gen, real, n_boot=200, seed=0) == out  # seeded
    fresh = [frechet_distance(draw(0.3), draw(0.0)) for _ in range(150)]
    true_width = float(np.subtract(*np.quantile(fresh, [0.975, 0.025])))
    assert 0.5 < (out["fid_hi"] - out["fid_lo"]) / true_width < 2.5


def test_feature_scores_reports_each_score_with_its_floor():
    rng = np.random.default_rng(6)
    real, other = rng.normal(size=(60, 16)), rng.normal(size=(60, 16))
    gen = rng.normal(loc=0.5, size=(60, 16))
    out = feature_scores(gen, real, other, seed=1)
    assert set(out) == {"n", "fid", "fid_interval", "fid_floor", "kid", "kid_std", "kid_subset", "kid_floor"}
    assert out["n"] == 60 and out["kid_subset"] == 30
    assert out["fid"] == pytest.approx(frechet_distance(gen, real)) and out["fid_floor"] == \
        pytest.approx(frechet_distance(other, real))
    assert (out["kid"], out["kid_std"]) == pytest.approx(kernel_inception_distance(gen, real, seed=1))
    assert out["fid_interval"][0] < out["fid"] < out["fid_interval"][1]
    assert out["fid_floor"] < out["fid_interval"][0] and out["kid_floor"] < out["kid"] - 2 * out["kid_std"]


def _corpus(seed: int, n: int = 30):
    rng = random.Random(seed)
    words = "a red blue green circle square triangle two three to the left of above below and".split()
    cands = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(n)]
    refs = [[" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(rng.randint(1, 3))]
            for _ in range(n)]
    for i in range(0, n, 4):  # some exact and near matches
        refs[i].append(cands[i])
    return cands, refs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleu_and_cider_match_pycocoevalcap(seed):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    cands, refs = _corpus(seed)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [c] for i, c in enumerate(cands)}
    ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ref_cider, _ = Cider().compute_score(gts, res)
    assert bleu(cands, refs) == pytest.approx(ref_bleu, rel=1e-9)
    assert cider(cands, refs) == pytest.approx(ref_cider, rel=1e-9)


def test_caption_scores_on_known_cases():
    refs = [["a red circle"], ["two blue squares"], ["a green triangle above a red square"]]
    exact = [r[0] for r in refs]
    assert bleu(exact, refs)[3] == pytest.approx(1.0, abs=1e-6)
    assert bleu(["a blue circle", "two red squares", "a green circle above a blue square"], refs)[3] < 0.5
    assert math.isnan(bleu(["a red circle"], [["a red circle"]])[3])  # no 4-gram anywhere: undefined, not 1e6
    assert cider(exact, refs) > cider(["a red square", "two blue circles", "a green circle"], refs)


def test_bits_per_caption():
    assert bits_per_caption(2 * math.log(2) * 10, 2) == pytest.approx(10.0)


def test_inception_features_from_the_packaged_torchscript():
    """The packaged InceptionV3 (installed by `make install`) gives 2048-d features; a set against itself has FID 0
    and the renders of two worlds are far apart."""
    import torch

    from data_pipelines import scenes
    from data_pipelines.shapes import Scene, render
    from transfusion.eval.inception import InceptionFeatures

    def batch(images):
        return torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])

    shapes = batch([scenes.heldout_sample(i, 0)[1] for i in range(6)])
    blank = batch([render(Scene([]), 32)] * 6)
    feats = InceptionFeatures(batch_size=6)
    a, b = feats(shapes), feats(blank)
    assert a.shape == (6, 2048) and np.isfinite(a).all() and a.std() > 0
    assert np.allclose(feats(shapes[:3]), a[:3], atol=1e-4)  # batching does not change features
    assert frechet_distance(a, a) < 1e-6 and frechet_distance(a, b) > 10
