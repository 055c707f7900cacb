"""Metric math, each checked against an independent reference in ``tests/test_scores.py``:

    frechet_distance   FID from two feature sets: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), float64; the trace
                       of the matrix square root is the sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2) (symmetric, so
                       no complex round-off as with a general sqrtm)
    kernel_inception   KID: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
                       random subsets (Binkowski et al. 2018; subset size min(n, 1000), 100 subsets as torch-fidelity)
    bleu               corpus BLEU-1..4 with the brevity penalty over the closest reference length (Papineni et al.
                       2002), computed as pycocoevalcap's BleuScorer does ("closest" effective reference length),
                       except that an order without any candidate n-gram is NaN (that scorer divides by 1e-15)
    cider              CIDEr-D (Vedantam et al. 2015) as pycocoevalcap's CiderScorer: tf-idf n-gram vectors (n = 1..4)
                       with document frequencies from the references, Gaussian length penalty sigma 6 (lengths
                       counted in bigrams, as that scorer does), clipped candidate counts, x10
    bits_per_caption   summed next-token NLL in nats -> bits

Captions are compared as lower-cased, whitespace-split tokens (no Java PTB tokenizer needed for this grammar).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np


# -- image distribution distances --------------------------------------------------------------------------------
def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(feats, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two [n, d] feature sets (float64)."""
    mu1, s1 = feature_stats(feats_a)
    mu2, s2 = feature_stats(feats_b)
    r1 = _psd_sqrt(s1)
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def kernel_inception_distance(feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    m = min(len(a), len(b), subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                    - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


# -- caption scores ----------------------------------------------------------------------------------------------
def tokens(text: str) -> list[str]:
    return text.lower().replace(".", " ").replace(",", " ").split()


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n of ``candidates`` against their reference lists."""
    clipped, total = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    tiny, small = 1e-9, 1e-15
    for cand, refs in zip(candidates, references, strict=True):
        c = tokens(cand)
        rs = [tokens(r) for r in refs]
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]  # closest reference length
        for n in range(1, max_n + 1):
            counts = _ngrams(c, n)
            max_ref: Counter = Counter()
            for r in rs:
                max_ref |= _ngrams(r, n)
            clipped[n - 1] += sum(min(k, max_ref[g]) for g, k in counts.items())
            total[n - 1] += max(len(c) - n + 1, 0)
    out, prod = [], 1.0
    for n in range(max_n):
        prod *= (clipped[n] + tiny) / (total[n] + small)
        # no candidate n-gram of this order at all: the reference scorer returns ~1e6^(1/n); we say undefined
        out.append(prod ** (1.0 / (n + 1)) if all(total[: n + 1]) else float("nan"))
    ratio = (cand_len + tiny) / (ref_len + small)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


def cider(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D of ``candidates`` against their reference lists (document frequency over the references)."""
    refs_ng = [[[_ngrams(tokens(r), k) for k in range(1, n + 1)] for r in refs] for refs in references]
    cands_ng = [[_ngrams(tokens(c), k) for k in range(1, n + 1)] for c in candidates]
    df: Counter = Counter()
    for refs in refs_ng:
        for g in {g for ref in refs for counts in ref for g in counts}:
            df[g] += 1
    log_n = math.log(float(len(references)))

    def vec(counts_by_n):
        vecs, norms = [], []
        for counts in counts_by_n:
            v = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in counts.items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms, sum(counts_by_n[1].values())  # length in bigrams, the reference scorer's convention

    scores = []
    for cand, refs in zip(cands_ng, refs_ng, strict=True):
        cv, cn, cl = vec(cand)
        total = np.zeros(n)
        for ref in refs:
            rv, rn, rl = vec(ref)
            for k in range(n):
                dot = sum(min(x, rv[k].get(g, 0.0)) * rv[k].get(g, 0.0) for g, x in cv[k].items())
                if cn[k] != 0 and rn[k] != 0:
                    dot /= cn[k] * rn[k]
                total[k] += dot * math.exp(-((cl - rl) ** 2) / (2 * sigma ** 2))
        scores.append(float(total.mean()) / len(refs) * 10.0)
    return float(np.mean(scores))


def bits_per_caption(nll_nats_sum: float, captions: int) -> float:
    """Mean caption NLL in bits from a sum of per-token NLLs in nats."""
    return nll_nats_sum / max(captions, 1) / math.log(2)
