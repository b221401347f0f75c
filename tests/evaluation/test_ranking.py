"""Ranks, Friedman, Nemenyi, Holm and Wilcoxon against scipy, Demšar's table and hand examples."""

import numpy as np
import pytest
from scipy import stats

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation import (
    compare_to_reference,
    friedman_test,
    holm,
    mean_ranks,
    nemenyi_critical_difference,
    rank_scores,
    wilcoxon_signed_rank,
)


def test_ranks_best_first_with_shared_ties():
    scores = np.array([[0.9, 0.8, 0.9, 0.7], [0.5, 0.6, 0.7, 0.8]])
    np.testing.assert_array_equal(
        rank_scores(scores), [[1.5, 3.0, 1.5, 4.0], [4.0, 3.0, 2.0, 1.0]]
    )
    np.testing.assert_array_equal(
        rank_scores(scores, greater_is_better=False), [[3.5, 2.0, 3.5, 1.0], [1, 2, 3, 4]]
    )
    assert mean_ranks(scores, names=["a", "b", "c", "d"]) == {
        "c": 1.75, "a": 2.75, "d": 2.5, "b": 3.0
    }
    assert list(mean_ranks(scores, names=["a", "b", "c", "d"])) == ["c", "d", "a", "b"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_friedman_matches_scipy_including_ties(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=(12, 5)) + np.arange(5) * 0.3, 1)  # ties within blocks
    ours = friedman_test(scores, names=list("abcde"))
    theirs = stats.friedmanchisquare(*scores.T)
    assert ours.statistic == pytest.approx(theirs.statistic)
    assert ours.pvalue == pytest.approx(theirs.pvalue)
    assert ours.df == 4 and ours.n_blocks == 12
    np.testing.assert_allclose(ours.mean_ranks, rank_scores(scores).mean(axis=0))


def test_friedman_pvalues_near_uniform_under_the_null():
    rng = np.random.default_rng(3)
    pvalues = [friedman_test(rng.normal(size=(20, 4))).pvalue for _ in range(400)]
    assert stats.kstest(pvalues, "uniform").pvalue > 0.001


def test_nemenyi_critical_values_match_demsar_table():
    # Demšar (2006), table 5(a): q_0.05 for k = 2..10
    table = [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164]
    for k, q in zip(range(2, 11), table):
        n = 14
        expected = q * np.sqrt(k * (k + 1) / (6 * n))
        assert nemenyi_critical_difference(k, n) == pytest.approx(expected, abs=2e-3)
    # table 5(a), alpha = 0.10, k = 5: 2.459
    assert nemenyi_critical_difference(5, 1, alpha=0.1) == pytest.approx(
        2.459 * np.sqrt(5), abs=2e-3
    )


def test_holm_hand_worked():
    # sorted 0.01, 0.02, 0.03, 0.04 -> 4*0.01, 3*0.02, 2*0.03, 1*0.04, then running max
    adjusted = holm([0.03, 0.01, 0.04, 0.02])
    np.testing.assert_allclose(adjusted, [0.06, 0.04, 0.06, 0.06])
    np.testing.assert_allclose(holm([0.5, 0.001]), [0.5, 0.002])
    np.testing.assert_allclose(holm([0.9, 0.3]), [0.9, 0.6])  # 2 * 0.3, then max(0.6, 0.9)


@pytest.mark.parametrize("n", [6, 12, 25, 70])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_wilcoxon_matches_scipy(n, ties, alternative):
    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    y = x + rng.normal(0.2, 1, n)
    if ties:
        x, y = np.round(x, 1), np.round(y, 1)
    ours = wilcoxon_signed_rank(x, y, alternative=alternative)
    theirs = stats.wilcoxon(x, y, alternative=alternative)
    assert ours.statistic == pytest.approx(theirs.statistic)
    assert ours.pvalue == pytest.approx(theirs.pvalue)


@pytest.mark.parametrize("zero_method", ["wilcox", "pratt"])
@pytest.mark.parametrize("correction", [False, True])
def test_wilcoxon_asymptotic_options_match_scipy(zero_method, correction):
    rng = np.random.default_rng(9)
    x = np.round(rng.normal(size=40), 1)
    y = np.round(x + rng.normal(0.2, 0.5, 40), 1)
    y[:3] = x[:3]  # zero differences
    ours = wilcoxon_signed_rank(x, y, zero_method=zero_method, correction=correction,
                                method="asymptotic")
    theirs = stats.wilcoxon(x, y, zero_method=zero_method, correction=correction,
                            method="asymptotic")
    assert ours.pvalue == pytest.approx(theirs.pvalue)


def test_compare_to_reference_wilcoxon_is_holm_over_scipy():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(15, 4)) + np.array([0.0, 0.5, 0.1, 1.0])
    results = compare_to_reference(scores, "ref", names=["ref", "b", "c", "d"])
    raw = [stats.wilcoxon(scores[:, j], scores[:, 0]).pvalue for j in (1, 2, 3)]
    np.testing.assert_allclose([r.pvalue for r in results], holm(raw))
    assert [r.compared for r in results] == [("b", "ref"), ("c", "ref"), ("d", "ref")]
    assert all("Holm" in r.method for r in results)


def test_compare_to_reference_rank_test_hand_worked():
    s = np.array([[0.9, 0.8, 0.7], [0.85, 0.8, 0.6], [0.7, 0.75, 0.6], [0.9, 0.7, 0.65]])
    # mean ranks 1.25, 1.75, 3.0; se = sqrt(3 * 4 / 24)
    se = np.sqrt(0.5)
    raw = [2 * stats.norm.sf(0.5 / se), 2 * stats.norm.sf(1.75 / se)]
    results = compare_to_reference(s, 0, test="rank")
    np.testing.assert_allclose([r.pvalue for r in results], holm(raw))


def test_bad_input_is_rejected():
    with pytest.raises(DataError, match="at least 3"):
        friedman_test(np.zeros((4, 2)))
    with pytest.raises(DataError, match="names"):
        friedman_test(np.zeros((4, 3)), names=["a", "b"])
    with pytest.raises(ConfigError, match="not a candidate"):
        compare_to_reference(np.zeros((4, 3)), "z", names=["a", "b", "c"])
    with pytest.raises(ConfigError, match="wilcoxon, rank"):
        compare_to_reference(np.zeros((4, 3)), 0, test="t")
    with pytest.raises(DataError, match="every difference is zero"):
        wilcoxon_signed_rank([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])
    with pytest.raises(ConfigError, match="alpha"):
        nemenyi_critical_difference(3, 10, alpha=5)
