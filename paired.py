"""Two models on the same images: DeLong's test of the difference of their ROC AUCs, and paired bootstrap
intervals of the difference of any score. compare.py reports them; the numbers are computed here.

DeLong, DeLong and Clarke-Pearson (1988), "Comparing the areas under two or more correlated receiver operating
characteristic curves: a nonparametric approach", Biometrics 44:837-845: each AUC is the mean of its
structural components, V10 (one per positive image: the share of negatives it outranks, ties counting half)
and V01 (one per negative: the share of positives that outrank it); the covariance of two AUCs is
S10 / m + S01 / n, from the covariances of their components over the m positive and n negative images. The
components come from midranks (Sun and Xu 2014, "Fast implementation of DeLong's algorithm"), O(N log N).
"""

import math

import numpy as np
from scipy import stats

from intervals import BOOTSTRAP_SEED, CONFIDENCE, bootstrap_counts, percentiles

PAIRED_RESAMPLES = 2000


def midranks(values):
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    return stats.rankdata(values, method="average")


def structural_components(scores, positive):
    """(V10 per positive image, V01 per negative image) of one model's scores."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    m, n = int(positive.sum()), int((~positive).sum())
    all_ranks = midranks(scores)
    positive_ranks, negative_ranks = midranks(scores[positive]), midranks(scores[~positive])
    v10 = (all_ranks[positive] - positive_ranks) / n  # negatives below each positive (ties: half)
    v01 = 1 - (all_ranks[~positive] - negative_ranks) / m  # positives above each negative
    return v10, v01


def delong(scores_a, scores_b, positive):
    """{auc_a, auc_b, difference, variance (2x2 covariance of the two AUCs), z, p_value (two-sided)} for two
    models' scores of the same images. p is NaN where the difference has no variance (identical rankings)."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        raise ValueError("DeLong's test needs positive and negative images")
    components = [structural_components(s, positive) for s in (scores_a, scores_b)]
    v10 = np.stack([c[0] for c in components])
    v01 = np.stack([c[1] for c in components])
    aucs = v10.mean(1)
    covariance = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    difference = float(aucs[0] - aucs[1])
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    z = difference / math.sqrt(variance) if variance > 1e-15 else math.nan
    p_value = float(2 * stats.norm.sf(abs(z))) if math.isfinite(z) else math.nan
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": difference, "variance": covariance,
            "z": z, "p_value": p_value}  # fmt: skip


def paired_bootstrap(score, labels, resamples=PAIRED_RESAMPLES, seed=BOOTSTRAP_SEED, confidence=CONFIDENCE):
    """Percentile interval (low, high) of a difference of two models' scores: `score(weights)` gives the
    difference for each row of `weights` ((R, N) image multiplicities), both models scored on the same
    resampled images, so that what they share cancels."""
    weights = bootstrap_counts(np.asarray(labels), resamples, seed).astype(np.float64)
    return percentiles(score(weights), 100 * (1 - confidence) / 2)
