"""Metric math against independent references: FID / KID against float64 numpy / scipy computations, BLEU / CIDEr
against pycocoevalcap's scorers (installed by `make install`), bits per caption."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from transfusion.eval.scores import bits_per_caption, bleu, cider, frechet_distance, kernel_inception_distance


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


def test_kid_matches_a_direct_unbiased_mmd():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 8)), rng.normal(loc=0.5, size=(40, 8))
    d = a.shape[1]

    def k(x, y):
        return (sum(float(xi) * float(yi) for xi, yi in zip(x, y)) / d + 1) ** 3

    m = len(a)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = kernel_inception_distance(a, b, subsets=3, subset_size=m)  # a full subset is a permutation
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9) and std < 1e-9
    same, _ = kernel_inception_distance(a, rng.normal(size=(40, 8)), subsets=50, subset_size=20)
    assert abs(same) < mean  # unbiased: near zero for one distribution


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
