"""Metric math, each checked against an independent reference in ``tests/test_scores.py``:

    frechet_distance   FID from two feature sets: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), float64; the trace
                       of the matrix square root is the sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2) (symmetric, so
                       no complex round-off as with a general sqrtm), or, with fewer rows than dimensions, the sum of
                       the singular values of the n x n matrix A B^T (A, B the centred features / sqrt(n - 1))
    fid_with_interval  FID with a bootstrap interval (rows resampled, the interval shifted by the bootstrap bias)
    kernel_inception   KID: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
                       random subsets (Binkowski et al. 2018; 100 subsets of half the rows, at most 1000, so the std
                       over subsets is a spread, not 0 as with subsets that are the whole set)
    feature_scores     both, with their floors (real vs other real images): what the evaluation reports print
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

from transfusion.eval.stats import bootstrap_samples


# -- image distribution distances --------------------------------------------------------------------------------
def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(feats, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fid_eigh(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID from the d x d covariances (the reference path: O(n d^2 + d^3))."""
    mu1, s1 = feature_stats(feats_a)
    mu2, s2 = feature_stats(feats_b)
    r1 = _psd_sqrt(s1)
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def _grams(feats_a: np.ndarray, feats_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inner products (a a^T [Na, Na], b b^T [Nb, Nb], a b^T [Na, Nb]) in float64, after shifting both sets by
    b's mean (FID does not change under a common shift; centred values lose less to cancellation)."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    shift_D = b.mean(0)
    a, b = a - shift_D, b - shift_D
    return a @ a.T, b @ b.T, a @ b.T


def _fid_from_grams(kaa_NN: np.ndarray, kbb_MM: np.ndarray, kab_NM: np.ndarray, wa_N: np.ndarray | None = None,
                    wb_M: np.ndarray | None = None) -> float:
    """FID from inner products alone, for rows with multiplicities ``wa`` / ``wb`` (a bootstrap resample's distinct
    rows and their counts; None: each row once). With A, B the centred features / sqrt(n - 1) (a row repeated w
    times as one row times sqrt(w)), S1 = A^T A and S2 = B^T B; the nonzero eigenvalues of S1 S2 are those of
    (A B^T)(A B^T)^T, so tr (S1 S2)^1/2 = the sum of the singular values of A B^T [N, M] (no d x d matrix)."""
    wa = np.ones(len(kaa_NN)) if wa_N is None else np.asarray(wa_N, dtype=np.float64)
    wb = np.ones(len(kbb_MM)) if wb_M is None else np.asarray(wb_M, dtype=np.float64)
    n, m = wa.sum(), wb.sum()
    a_mub_N, mua_b_M = kab_NM @ wb / m, wa @ kab_NM / n  # x_k . mu_b, mu_a . y_l
    mua_mua, mub_mub, mua_mub = wa @ kaa_NN @ wa / n ** 2, wb @ kbb_MM @ wb / m ** 2, wa @ a_mub_N / n
    tr1 = (wa @ np.diag(kaa_NN) - n * mua_mua) / (n - 1)  # sum |x_i - mu_a|^2 / (n - 1)
    tr2 = (wb @ np.diag(kbb_MM) - m * mub_mub) / (m - 1)
    cross_NM = (kab_NM - a_mub_N[:, None] - mua_b_M[None, :] + mua_mub) * np.sqrt(wa)[:, None] * np.sqrt(wb)[None, :]
    tr_sqrt = np.linalg.svd(cross_NM, compute_uv=False).sum() / math.sqrt((n - 1) * (m - 1))
    return float(mua_mua + mub_mub - 2 * mua_mub + tr1 + tr2 - 2 * tr_sqrt)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, method: str = "auto") -> float:
    """FID between two [n, d] feature sets (float64). ``method``: "eigh" (d x d covariances), "gram" (n x n inner
    products, exact by the identity in ``_fid_from_grams``; far faster when n < d, e.g. 100 x 2048 Inception
    features) or "auto" (gram when both sets have fewer rows than dimensions)."""
    na, nb, d = len(feats_a), len(feats_b), np.shape(feats_a)[1]
    if min(na, nb) < 2:
        raise ValueError("FID needs at least 2 samples per set")
    if method == "auto":
        method = "gram" if max(na, nb) < d else "eigh"
    if method == "gram":
        return _fid_from_grams(*_grams(feats_a, feats_b))
    if method == "eigh":
        return _fid_eigh(feats_a, feats_b)
    raise ValueError(f"unknown FID method {method!r} (auto, gram, eigh)")


def fid_with_interval(gen_f: np.ndarray, real_f: np.ndarray, n_boot: int = 200, level: float = 0.95,
                      seed: int = 0) -> dict:
    """FID of generated vs real features with a bootstrap interval: generated and real rows resampled independently
    with replacement, ``n_boot`` times. A resample repeats rows (about 63% distinct), which inflates FID by itself,
    so the raw percentile interval lies above the estimate (at n = 100, d = 2048 it need not contain it): the
    interval returned is that percentile interval shifted by the bootstrap bias, mean(FID*) - FID, i.e. the
    resampling spread placed around the estimate. It is the spread of FID at this n, not an interval for the
    infinite-sample FID (FID is biased upward at small n). In simulations at n = 100, d = 2048 its width was 1.1 to
    2 times the true sampling spread (conservative). Cost: n_boot SVDs of about 0.63 n x 0.63 n with fewer rows than
    dimensions (a second at n = 100, about 1.5 min at n = 1000 on 2 busy cores), else n_boot d x d eigen-problems
    (slow at d = 2048). Returns {"fid", "fid_lo", "fid_hi", "fid_boot_bias", "n"} (n: generated rows)."""
    gen, real = np.asarray(gen_f, dtype=np.float64), np.asarray(real_f, dtype=np.float64)
    fid = frechet_distance(gen, real)  # "auto": the gram path exactly when the resamples below take it
    if max(len(gen), len(real)) < gen.shape[1]:  # resample the inner products, not the features
        kaa, kbb, kab = _grams(gen, real)

        def resampled(i: np.ndarray, j: np.ndarray) -> float:  # distinct rows (~63%) with their counts: exact
            (ui, wi), (uj, wj) = np.unique(i, return_counts=True), np.unique(j, return_counts=True)
            return _fid_from_grams(kaa[np.ix_(ui, ui)], kbb[np.ix_(uj, uj)], kab[np.ix_(ui, uj)], wi, wj)
    else:
        def resampled(i: np.ndarray, j: np.ndarray) -> float:
            return _fid_eigh(gen[i], real[j])

    boot_B = bootstrap_samples(resampled, np.arange(len(gen)), np.arange(len(real)), n_boot=n_boot, seed=seed,
                               paired=False)
    bias = float(boot_B.mean()) - fid
    lo, hi = np.quantile(boot_B, [(1 - level) / 2, (1 + level) / 2])
    return {"fid": fid, "fid_lo": float(lo) - bias, "fid_hi": float(hi) - bias, "fid_boot_bias": bias,
            "n": len(gen)}


def kid_subset_size(n: int) -> int:
    """KID's default subset size for sets of n rows: half of them (so subsets differ and their spread means
    something), at least 2, at most 1000 (torch-fidelity's size)."""
    return min(1000, max(2, n // 2))


_KID_KERNEL_MAX_ROWS = 2048  # up to this many rows per set the kernel matrices are computed once (<= 100 MB)


def _poly_kernel(x_ND: np.ndarray, y_MD: np.ndarray) -> np.ndarray:
    return (x_ND @ y_MD.T / x_ND.shape[1] + 1) ** 3


def _unbiased_mmd2(kxx_MM: np.ndarray, kyy_MM: np.ndarray, kxy_MM: np.ndarray) -> float:
    m = len(kxx_MM)
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx_MM) + off(kyy_MM) - 2 * kxy_MM.mean())


def kernel_inception_distance(feats_a: np.ndarray, feats_b: np.ndarray, subsets: int = 100,
                              subset_size: int | None = None, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets drawn without replacement): unbiased MMD^2 with
    k(x, y) = (x.y / d + 1)^3. ``subset_size`` None: ``kid_subset_size`` of the smaller set. The mean estimates the
    full-set unbiased MMD^2; the std is the spread of KID measured on subset_size rows (larger than at the full n)."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    size = kid_subset_size(min(len(a), len(b))) if subset_size is None else subset_size
    m = min(len(a), len(b), size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    full = max(len(a), len(b)) <= _KID_KERNEL_MAX_ROWS
    if full:
        kaa, kbb, kab = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        i, j = rng.choice(len(a), m, replace=False), rng.choice(len(b), m, replace=False)
        if full:
            vals.append(_unbiased_mmd2(kaa[np.ix_(i, i)], kbb[np.ix_(j, j)], kab[np.ix_(i, j)]))
        else:
            x, y = a[i], b[j]
            vals.append(_unbiased_mmd2(_poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)))
    return float(np.mean(vals)), float(np.std(vals))


def feature_scores(gen_f: np.ndarray, real_f: np.ndarray, other_real_f: np.ndarray, seed: int = 0) -> dict:
    """FID (with its bootstrap interval, ``fid_with_interval``) and KID (default subsets) of generated vs real
    features, and their floors: ``other_real_f`` (distinct real images, as many) vs the same real features.
    Returns {"n", "fid", "fid_interval": [lo, hi] (95%), "fid_floor", "kid", "kid_std", "kid_subset",
    "kid_floor"}; n is the number of generated rows."""
    fid = fid_with_interval(gen_f, real_f, seed=seed)
    kid, kid_std = kernel_inception_distance(gen_f, real_f, seed=seed)
    kid_floor, _ = kernel_inception_distance(other_real_f, real_f, seed=seed)
    return {"n": fid["n"], "fid": fid["fid"], "fid_interval": [fid["fid_lo"], fid["fid_hi"]],
            "fid_floor": frechet_distance(other_real_f, real_f), "kid": kid, "kid_std": kid_std,
            "kid_subset": kid_subset_size(min(len(gen_f), len(real_f))), "kid_floor": kid_floor}


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
