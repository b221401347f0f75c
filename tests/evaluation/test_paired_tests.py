"""Paired tests: hand-worked McNemar and Cochran's Q, agreement with scipy, uniform null p-values."""

import numpy as np
import pytest
from scipy import stats

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation import (
    cochrans_q,
    corrected_resampled_ttest,
    mcnemar,
    mcnemar_from_counts,
    metric_permutation_test,
    paired_permutation_test,
)


def test_mcnemar_hand_worked():
    # b = 10, c = 3: chi2 = (|10 - 3| - 1)^2 / 13 = 36 / 13; exact p = 2 P(X <= 3), X ~ Bin(13, .5)
    corrected = mcnemar_from_counts(10, 3, method="corrected")
    assert corrected.statistic == pytest.approx(36 / 13)
    assert corrected.pvalue == pytest.approx(0.09609, abs=1e-5)  # chi2(1) tail at 2.7692
    uncorrected = mcnemar_from_counts(10, 3, method="uncorrected")
    assert uncorrected.statistic == pytest.approx(49 / 13)
    exact = mcnemar_from_counts(10, 3, method="exact")
    assert exact.statistic == 3
    assert exact.pvalue == pytest.approx(2 * (1 + 13 + 78 + 286) / 2**13)


def test_mcnemar_exact_agrees_with_scipy_binomtest():
    for b, c in [(0, 5), (7, 7), (20, 9), (100, 130)]:
        expected = stats.binomtest(b, b + c, 0.5).pvalue
        assert mcnemar_from_counts(b, c).pvalue == pytest.approx(expected)


def test_mcnemar_counts_discordant_pairs_from_predictions():
    y = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    a = np.array([0, 1, 1, 0, 0, 1, 1, 0])  # right on 0, 1, 2, 3, 6
    b = np.array([1, 1, 0, 0, 1, 1, 0, 0])  # right on 1, 3, 4
    r = mcnemar(y, a, np.eye(2)[b], names=("a", "b"))
    assert (r.b, r.c) == (3, 1)  # a-only: 0, 2, 6; b-only: 4
    assert r.compared == ("a", "b")
    assert "b=3, c=1" in str(r)


def test_mcnemar_without_disagreement_has_p_one():
    assert mcnemar_from_counts(0, 0, method="corrected").pvalue == 1.0
    assert mcnemar_from_counts(0, 0).pvalue == 1.0


def test_cochrans_q_hand_worked_and_equal_to_mcnemar_for_two_models():
    c = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 0]])
    # C = (4, 3, 1), T = 8, sum R^2 = 16: Q = 2 (3 * 26 - 64) / (24 - 16) = 3.5
    r = cochrans_q(c)
    assert r.statistic == pytest.approx(3.5)
    assert r.pvalue == pytest.approx(np.exp(-3.5 / 2))  # chi2(2) tail
    rng = np.random.default_rng(0)
    two = rng.random((200, 2)) < [0.7, 0.6]
    b = int(np.sum(two[:, 0] & ~two[:, 1]))
    cc = int(np.sum(~two[:, 0] & two[:, 1]))
    assert cochrans_q(two).statistic == pytest.approx((b - cc) ** 2 / (b + cc))


def test_corrected_resampled_ttest_formula_and_scipy_limit():
    d = np.array([0.012, 0.03, -0.004, 0.021, 0.017, 0.009, 0.025, 0.001, 0.014, 0.02])
    r = corrected_resampled_ttest(d, n_train=900, n_test=100)
    expected_t = d.mean() / np.sqrt((1 / 10 + 100 / 900) * d.var(ddof=1))
    assert r.statistic == pytest.approx(expected_t)
    assert r.pvalue == pytest.approx(2 * stats.t.sf(abs(expected_t), 9))
    # with a vanishing test share it is the paired t-test
    limit = corrected_resampled_ttest(d, n_train=10**12, n_test=1)
    assert limit.statistic == pytest.approx(stats.ttest_1samp(d, 0).statistic, rel=1e-6)
    paired = stats.ttest_rel(d + 1.0, np.ones_like(d))
    assert limit.pvalue == pytest.approx(paired.pvalue, rel=1e-6)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_paired_permutation_test_exact_agrees_with_scipy(alternative):
    rng = np.random.default_rng(1)
    x = rng.normal(size=11)
    y = x + rng.normal(0.4, 1, 11)
    ours = paired_permutation_test(x, y, alternative=alternative)
    theirs = stats.permutation_test(
        (x, y), lambda a, b: np.mean(a - b), permutation_type="samples",
        alternative=alternative,
    )
    assert "exact" in ours.method
    assert ours.pvalue == pytest.approx(theirs.pvalue)
    assert ours.statistic == pytest.approx(np.mean(x - y))


def test_paired_permutation_test_randomised_close_to_scipy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=40)
    y = x + rng.normal(0.3, 1, 40)
    ours = paired_permutation_test(x, y, n_resamples=20000, random_state=0)
    theirs = stats.permutation_test(
        (x, y), lambda a, b: np.mean(a - b), permutation_type="samples", n_resamples=20000,
        rng=1,
    )
    assert ours.pvalue == pytest.approx(theirs.pvalue, abs=0.01)


def test_accuracy_permutation_test_is_the_sign_test_on_discordant_samples():
    # swapping predictions changes only discordant samples: the null is McNemar's exact one
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 400)
    a = np.eye(3)[np.where(rng.random(400) < 0.75, y, (y + 1) % 3)]
    b = np.eye(3)[np.where(rng.random(400) < 0.68, y, (y + 2) % 3)]
    perm = metric_permutation_test(a, b, y, n_resamples=40000, random_state=0)
    exact = mcnemar(y, a, b, method="exact")
    assert perm.pvalue == pytest.approx(exact.pvalue, abs=0.006)
    assert perm.statistic == pytest.approx(np.mean(a.argmax(1) == y) - np.mean(b.argmax(1) == y))


def test_metric_permutation_test_for_a_metric_without_sums():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 200)
    good = np.clip(y + rng.normal(0, 0.4, 200), 0, 1)
    bad = np.clip(y + rng.normal(0, 1.5, 200), 0, 1)
    a = np.stack([1 - good, good], 1)
    b = np.stack([1 - bad, bad], 1)
    r = metric_permutation_test(a, b, y, metric="auroc", n_resamples=199, random_state=0)
    assert r.pvalue == pytest.approx(2 / 200)  # two-sided: twice (0 + 1) / (199 + 1)
    assert "auroc" in r.method


def _ks_pvalue(pvalues):
    return stats.kstest(pvalues, "uniform").pvalue


def test_permutation_pvalues_are_uniform_under_the_null():
    rng = np.random.default_rng(5)
    pvalues = []
    for t in range(300):
        x = rng.normal(size=30)
        y = rng.normal(size=30)
        pvalues.append(paired_permutation_test(x, y, n_resamples=499, random_state=t).pvalue)
    assert _ks_pvalue(pvalues) > 0.001


def test_metric_permutation_pvalues_are_uniform_under_the_null():
    # two exchangeable models (their predictions of each sample drawn alike): NLL differences
    rng = np.random.default_rng(6)
    pvalues = []
    for t in range(200):
        y = rng.integers(0, 2, 80)
        pa = rng.uniform(0.05, 0.95, 80)
        pb = rng.uniform(0.05, 0.95, 80)
        a = np.stack([1 - pa, pa], 1)
        b = np.stack([1 - pb, pb], 1)
        r = metric_permutation_test(a, b, y, metric="nll", n_resamples=199, random_state=t)
        pvalues.append(r.pvalue)
    assert _ks_pvalue(pvalues) > 0.001


def test_corrected_ttest_pvalues_are_uniform_for_independent_differences():
    rng = np.random.default_rng(7)
    pvalues = [
        corrected_resampled_ttest(rng.normal(size=12), n_train=10**12, n_test=1).pvalue
        for _ in range(500)
    ]
    assert _ks_pvalue(pvalues) > 0.001


def test_bad_input_is_rejected():
    with pytest.raises(ConfigError, match="exact, corrected, uncorrected"):
        mcnemar_from_counts(1, 2, method="midp")
    with pytest.raises(DataError, match="predictions"):
        mcnemar(np.array([0, 1]), np.array([0, 1, 1]), np.array([0, 1]))
    with pytest.raises(DataError, match="n_models"):
        cochrans_q(np.ones((5, 1)))
    with pytest.raises(DataError, match="0/1"):
        cochrans_q(np.full((3, 2), 2))
    with pytest.raises(ConfigError, match="alternative"):
        paired_permutation_test([1.0], [2.0], alternative="bigger")
    with pytest.raises(DataError, match="at least 2"):
        corrected_resampled_ttest(np.array([0.1]), n_train=9, n_test=1)


def test_ece_permutation_test_separates_calibrated_from_overconfident():
    rng = np.random.default_rng(8)
    n = 400
    conf = rng.uniform(0.55, 0.95, n)
    y = (rng.random(n) < conf).astype(int)  # class 1 is right with probability conf
    calibrated = np.stack([1 - conf, conf], 1)
    sharp = np.stack([1 - conf**0.2, conf**0.2], 1)  # pushed towards 1: overconfident
    r = metric_permutation_test(sharp, calibrated, y, metric="ece", n_resamples=299,
                                random_state=0)
    assert r.statistic > 0.05 and r.pvalue < 0.05
    same = metric_permutation_test(calibrated, calibrated.copy(), y, metric="ece",
                                   n_resamples=99, random_state=0)
    assert same.statistic == 0 and same.pvalue == 1.0
