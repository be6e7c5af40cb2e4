"""Statistics behind the evidence report: case bootstrap, paired tests, Holm, rank-then-aggregate.

Pure numpy/scipy, no I/O. The bootstrap is written out rather than calling ``scipy.stats.bootstrap`` per cell
because a grid needs thousands of intervals that share resamples: one draw of case counts per test set serves
every cell, row, column and paired difference on that set. It draws exactly as scipy does
(``rng.integers(0, n, (n_resamples, n))``) and takes scipy's percentile interval, so with the same generator
state the numbers are scipy's (checked in ``tests/test_stats.py``).

A mean over (case, organ) pairs is a ratio: the sum of a case's values over the count of its scored pairs.
Resampling cases keeps a case's organs together, and with every organ scored it equals the mean over cases of
the per-case organ mean.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["bootstrap_counts", "bootstrap_mean", "case_ranks", "holm", "percentile_interval",
           "rank_frequencies", "ratio_replicates", "rng_for", "wilcoxon_p"]


def rng_for(seed: int, *names: str) -> np.random.Generator:
    """A generator fixed by ``seed`` and names (a test set): its resamples do not depend on what else is reported."""
    return np.random.default_rng([int(seed), *(zlib.crc32(name.encode()) for name in names)])


def bootstrap_counts(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_resamples, n)`` float counts of how often each of ``n`` cases is drawn in each resample, from the
    same indices ``scipy.stats.bootstrap`` draws with this generator."""
    if n < 1:
        raise ValueError("bootstrap needs at least one case")
    index = rng.integers(0, n, (n_resamples, n))
    flat = index + (np.arange(n_resamples) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)


def ratio_replicates(counts: np.ndarray, sums: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Resampled means ``(counts @ sums) / (counts @ weights)``: per-case value sums and scored-pair counts
    (``(n,)`` or ``(n, k)``) to ``(n_resamples[, k])``. A resample without any scored pair gives NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ sums) / (counts @ weights)


def percentile_interval(replicates: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval along axis 0 (linear interpolation, as scipy's ``method='percentile'``)."""
    alpha = (1 - confidence) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha], axis=0)
    return low, high


def bootstrap_mean(values: Sequence[float], n_resamples: int = 10_000, confidence: float = 0.95,
                   rng: np.random.Generator | None = None) -> tuple[float, float, float]:
    """Mean of one sample and its percentile bootstrap interval: ``(mean, low, high)``."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(0) if rng is None else rng
    replicates = ratio_replicates(bootstrap_counts(len(values), n_resamples, rng), values, np.ones_like(values))
    low, high = percentile_interval(replicates, confidence)
    return float(values.mean()), float(low), float(high)


def wilcoxon_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples (scipy's defaults); 1.0 when every difference
    is zero (scipy gives NaN there), NaN without pairs."""
    difference = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if difference.size == 0:
        return float("nan")
    if not np.any(difference != 0):
        return 1.0
    return float(stats.wilcoxon(difference).pvalue)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values for one family (NaN entries stay NaN and do not count)."""
    p = np.asarray(pvalues, np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    if m:
        order = valid[np.argsort(p[valid], kind="stable")]
        adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
        out[order] = np.minimum(adjusted, 1.0)
    return out


def case_ranks(values: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Rank the entries (columns) of every case (row), 1 = best; ties share the best rank (challengeR's
    ``ties.method = "min"``)."""
    values = np.asarray(values, np.float64)
    return stats.rankdata(-values if higher_is_better else values, method="min", axis=1).astype(np.float64)


def rank_frequencies(mean_ranks: np.ndarray) -> np.ndarray:
    """From resampled mean ranks ``(n_resamples, n_entries)`` (lower is better): ``freq[e, r]``, the share of
    resamples in which entry ``e`` holds rank ``r + 1`` (ties share the best rank)."""
    final = stats.rankdata(mean_ranks, method="min", axis=1).astype(np.intp) - 1
    n_entries = mean_ranks.shape[1]
    freq = np.zeros((n_entries, n_entries))
    for entry in range(n_entries):
        freq[entry] = np.bincount(final[:, entry], minlength=n_entries) / len(final)
    return freq
