"""Risk-coverage curves, AURC and E-AURC against definitions written out here."""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest
import scipy.stats

import modelfuse.evaluation.selective as selective_module
from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation import (
    aurc,
    bootstrap_selective,
    confidence_scores,
    e_aurc,
    risk_coverage_curve,
)


def _aurc_by_definition(order: np.ndarray, right: np.ndarray) -> float:
    """(1/n) sum_k (errors among the first k in ``order``) / k."""
    wrong = ~right[order]
    n = len(order)
    return float(np.mean([wrong[:k].sum() / k for k in range(1, n + 1)]))


def test_examples_run() -> None:
    result = doctest.testmod(selective_module)
    assert result.attempted > 0 and result.failed == 0


def test_no_ties_matches_definition() -> None:
    rng = np.random.default_rng(0)
    conf = rng.random(40)
    right = rng.random(40) < 0.7
    curve = risk_coverage_curve(conf, right)
    order = np.argsort(-conf)
    assert curve.aurc == pytest.approx(_aurc_by_definition(order, right), abs=1e-12)
    # one point per sample, coverage k/n, risk = errors among the top k / k
    np.testing.assert_allclose(curve.coverage, np.arange(1, 41) / 40)
    wrong_sorted = ~right[order]
    np.testing.assert_allclose(curve.risk, np.cumsum(wrong_sorted) / np.arange(1, 41))
    np.testing.assert_allclose(curve.threshold, conf[order])
    oracle_order = np.argsort(~right, kind="stable")  # every correct sample first
    assert curve.oracle_aurc == pytest.approx(_aurc_by_definition(oracle_order, right))
    assert curve.e_aurc == pytest.approx(curve.aurc - curve.oracle_aurc)


def test_ties_are_a_block_averaged_over_orders() -> None:
    conf = np.array([0.9, 0.7, 0.7, 0.7, 0.5, 0.5])
    right = np.array([True, False, True, True, False, True])
    curve = risk_coverage_curve(conf, right)
    # one point per distinct confidence: after 1, 4 and 6 samples
    np.testing.assert_allclose(curve.coverage, [1 / 6, 4 / 6, 1.0])
    np.testing.assert_allclose(curve.risk, [0.0, 1 / 4, 2 / 6])
    np.testing.assert_allclose(curve.threshold, [0.9, 0.7, 0.5])
    # AURC = the mean over every order of the tied samples
    values = [
        _aurc_by_definition(np.array([0, *a, *b]), right)
        for a in itertools.permutations([1, 2, 3])
        for b in itertools.permutations([4, 5])
    ]
    assert curve.aurc == pytest.approx(np.mean(values), abs=1e-12)
    # every sample tied: the curve is one point and AURC the mean over all orders
    same = risk_coverage_curve(np.zeros(4), np.array([True, False, False, True]))
    assert same.coverage.tolist() == [1.0]
    orders = [
        _aurc_by_definition(np.array(o), np.array([True, False, False, True]))
        for o in itertools.permutations(range(4))
    ]
    assert same.aurc == pytest.approx(np.mean(orders))


def test_hand_worked_two_samples() -> None:
    # the confident one is wrong: risks 1 and 1/2; oracle 0 and 1/2
    assert aurc(np.array([0.9, 0.1]), np.array([False, True])) == pytest.approx(0.75)
    assert e_aurc(np.array([0.9, 0.1]), np.array([False, True])) == pytest.approx(0.5)
    # the right order: E-AURC is 0
    assert e_aurc(np.array([0.1, 0.9]), np.array([False, True])) == pytest.approx(0.0)


def test_oracle_closed_form_for_large_n() -> None:
    # Geifman et al. 2019: AURC* ~ r + (1 - r) ln(1 - r) for the error rate r
    n, errors = 20000, 3000
    right = np.arange(n) >= errors
    curve = risk_coverage_curve(np.random.default_rng(1).random(n), right)
    r = errors / n
    assert curve.oracle_aurc == pytest.approx(r + (1 - r) * np.log(1 - r), abs=1e-3)
    # a random score's AURC is the error rate, up to sampling error
    assert curve.aurc == pytest.approx(r, abs=0.01)


def test_e_aurc_never_negative() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        n = int(rng.integers(1, 30))
        conf = rng.integers(0, 4, n).astype(float)
        right = rng.random(n) < 0.5
        assert e_aurc(conf, right) >= 0


def test_confidence_scores() -> None:
    rng = np.random.default_rng(3)
    members = rng.dirichlet(np.ones(4), size=(3, 25))
    one = members[0]
    np.testing.assert_allclose(confidence_scores(one), one.max(axis=1))
    np.testing.assert_allclose(
        confidence_scores(one, score="negative_entropy"), -scipy.stats.entropy(one, axis=1)
    )
    mean = members.mean(axis=0)
    np.testing.assert_allclose(confidence_scores(members), mean.max(axis=1))
    mi = scipy.stats.entropy(mean, axis=1) - np.mean(
        [scipy.stats.entropy(members[m], axis=1) for m in range(3)], axis=0
    )
    np.testing.assert_allclose(
        confidence_scores(members, score="negative_mutual_information"), -mi, atol=1e-12
    )
    logits = np.log(one) + 1.0
    np.testing.assert_allclose(confidence_scores(logits, kind="logits"), one.max(axis=1))


def test_bootstrap_against_a_plain_resampling_loop() -> None:
    rng = np.random.default_rng(4)
    conf = rng.random(150)
    right = rng.random(150) < 0.3 + 0.6 * conf
    result = bootstrap_selective(conf, right, n_resamples=2000, random_state=0, method="percentile")
    assert result.statistic == pytest.approx(aurc(conf, right))
    reference = []
    check = np.random.default_rng(99)
    for _ in range(2000):
        index = check.integers(0, 150, 150)
        reference.append(aurc(conf[index], right[index]))
    reference = np.array(reference)
    dist = result.bootstrap_distribution
    # two independent bootstrap runs of the same statistic: means and spreads agree
    assert dist.mean() == pytest.approx(reference.mean(), abs=3 * reference.std() / np.sqrt(1000))
    assert dist.std() == pytest.approx(reference.std(), rel=0.1)
    low, high = np.percentile(reference, [2.5, 97.5])
    assert result.ci[0] == pytest.approx(low, abs=0.25 * reference.std())
    assert result.ci[1] == pytest.approx(high, abs=0.25 * reference.std())
    bca = bootstrap_selective(conf, right, metric="e_aurc", n_resamples=1000, random_state=0)
    assert bca.statistic == pytest.approx(e_aurc(conf, right))
    assert bca.ci[0] <= bca.statistic <= bca.ci[1]
    again = bootstrap_selective(conf, right, metric="e_aurc", n_resamples=1000, random_state=0)
    assert again.ci == bca.ci


def test_bad_inputs() -> None:
    with pytest.raises(DataError, match="confidence: expected finite"):
        aurc(np.array([0.5, np.nan]), np.array([True, False]))
    with pytest.raises(DataError, match=r"correct: expected shape \(2,\)"):
        aurc(np.array([0.5, 0.4]), np.array([True]))
    with pytest.raises(DataError, match="correct: expected booleans"):
        aurc(np.array([0.5, 0.4]), np.array([2, 0]))
    with pytest.raises(DataError, match="confidence: expected shape"):
        aurc(np.array([]), np.array([], dtype=bool))
    with pytest.raises(ConfigError, match="score: unknown 'margin'; expected one of"):
        confidence_scores(np.eye(2), score="margin")
    with pytest.raises(DataError, match="needs the members' predictions"):
        confidence_scores(np.eye(2), score="negative_mutual_information")
    with pytest.raises(ConfigError, match="metric: unknown 'auc'"):
        bootstrap_selective(np.ones(3), np.ones(3, dtype=bool), metric="auc")
    with pytest.raises(ConfigError, match="n_resamples"):
        bootstrap_selective(np.ones(3), np.ones(3, dtype=bool), n_resamples=1)
