"""``aeval.stats`` against scipy: the bootstrap draws scipy's resamples and gives scipy's percentile interval
(alone and paired), the Wilcoxon p is scipy's, Holm matches a hand-worked family, ranks follow challengeR."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import aeval.stats as st


def _sample(n=57, seed=1):
    return np.random.default_rng(seed).beta(8, 2, n) * 100


def test_bootstrap_mean_is_scipys_percentile_bootstrap():
    values = _sample()
    ours = st.bootstrap_mean(values, 10_000, 0.95, np.random.default_rng(42))
    ref = stats.bootstrap((values,), np.mean, n_resamples=10_000, method="percentile", confidence_level=0.95,
                          rng=np.random.default_rng(42), vectorized=True)
    assert ours[0] == pytest.approx(values.mean(), abs=1e-12)
    assert ours[1] == pytest.approx(ref.confidence_interval.low, abs=1e-10)
    assert ours[2] == pytest.approx(ref.confidence_interval.high, abs=1e-10)
    counts = st.bootstrap_counts(len(values), 10_000, np.random.default_rng(42))
    replicates = st.ratio_replicates(counts, values, np.ones_like(values))
    np.testing.assert_allclose(replicates, ref.bootstrap_distribution, rtol=0, atol=1e-10)


def test_paired_bootstrap_is_scipys():
    a, b = _sample(40, 2), _sample(40, 3)
    ref = stats.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), paired=True,
                          n_resamples=5000, method="percentile", rng=np.random.default_rng(7), vectorized=True)
    counts = st.bootstrap_counts(40, 5000, np.random.default_rng(7))
    ones = np.ones(40)
    difference = st.ratio_replicates(counts, a, ones) - st.ratio_replicates(counts, b, ones)
    np.testing.assert_allclose(difference, ref.bootstrap_distribution, atol=1e-10)
    low, high = st.percentile_interval(difference)
    assert (low, high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=1e-10)


def test_ratio_mean_resamples_cases_with_their_organs():
    """A cell mean over (case, organ) pairs with some pairs dropped: sum over drawn cases / pairs drawn."""
    rng = np.random.default_rng(0)
    values = rng.random((12, 8))
    scored = rng.random((12, 8)) > 0.2
    index = np.random.default_rng(5).integers(0, 12, (300, 12))
    expected = [values[i][scored[i]].mean() for i in index]
    counts = st.bootstrap_counts(12, 300, np.random.default_rng(5))
    got = st.ratio_replicates(counts, (values * scored).sum(1), scored.sum(1).astype(float))
    np.testing.assert_allclose(got, expected, atol=1e-12)
    full = st.ratio_replicates(counts, values.sum(1), np.full(12, 8.0))  # all scored: mean of case means
    np.testing.assert_allclose(full, [values[i].mean(1).mean() for i in index], atol=1e-12)


def test_counts_sum_to_n_and_seeds_are_per_name():
    counts = st.bootstrap_counts(30, 100, st.rng_for(0, "btcv"))
    assert counts.shape == (100, 30) and np.all(counts.sum(1) == 30)
    again = st.bootstrap_counts(30, 100, st.rng_for(0, "btcv"))
    other = st.bootstrap_counts(30, 100, st.rng_for(0, "word"))
    assert np.array_equal(counts, again) and not np.array_equal(counts, other)


def test_wilcoxon_is_scipys():
    a, b = _sample(30, 4), _sample(30, 5)
    assert st.wilcoxon_p(a, b) == stats.wilcoxon(a - b).pvalue
    assert st.wilcoxon_p(a, a) == 1.0
    assert np.isnan(st.wilcoxon_p([], []))


def test_holm_hand_worked():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone 0.06
    assert st.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert st.holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])
    assert st.holm([0.9, 0.6, 0.02]) == pytest.approx([1.0, 1.0, 0.06])
    got = st.holm([0.01, np.nan, 0.02])
    assert np.isnan(got[1]) and got[[0, 2]] == pytest.approx([0.02, 0.02])


def test_ranks_and_rank_frequencies():
    assert st.case_ranks(np.array([[0.9, 0.8, 0.9], [0.1, 0.2, 0.3]])).tolist() == [[1, 3, 1], [3, 2, 1]]
    means = np.array([[1.0, 2.0, 3.0], [2.0, 1.0, 3.0], [1.0, 2.0, 3.0], [1.5, 1.5, 3.0]])
    freq = st.rank_frequencies(means)
    assert freq.tolist() == [[0.75, 0.25, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
