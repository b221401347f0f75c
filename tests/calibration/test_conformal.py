"""Conformal prediction sets: hand-worked scores and thresholds, and coverage by simulation."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

import modelfuse.calibration.conformal as conformal_module
from modelfuse.calibration import (
    ConformalClassifier,
    average_set_size,
    conformal_quantile,
    conformal_scores,
    empirical_coverage,
)
from modelfuse.errors import ConfigError, DataError


def test_examples_run() -> None:
    result = doctest.testmod(conformal_module)
    assert result.attempted > 0 and result.failed == 0


def test_quantile_is_the_corrected_order_statistic() -> None:
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9
    for alpha in (0.1, 0.2, 0.25, 0.5, 0.75):
        rank = math.ceil(10 * (1 - alpha))  # ceil((n + 1)(1 - alpha))
        assert conformal_quantile(scores, alpha) == np.sort(scores)[rank - 1]
    # n = 19, alpha = 0.1: (n + 1)(1 - alpha) = 18 exactly, not 19 by rounding
    assert conformal_quantile(np.arange(19.0), 0.1) == 17.0
    assert conformal_quantile(scores, 0.05) == math.inf  # 0.05 < 1 / 10


def test_lac_hand_worked() -> None:
    cal = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    y = np.array([0, 1, 2, 1])
    # scores 1 - p_y: 0.3, 0.2, 0.6, 0.6; alpha 0.4: rank ceil(5 * 0.6) = 3 -> 0.6
    model = ConformalClassifier("lac", alpha=0.4).fit(cal, y)
    assert model.quantile_ == pytest.approx(0.6)
    sets = model.predict_sets(np.array([[0.45, 0.35, 0.2], [0.3, 0.3, 0.4]]))
    # labels with p >= 0.4
    assert sets.tolist() == [[True, False, False], [False, False, True]]


def test_aps_hand_worked() -> None:
    cal = np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]])
    y = np.array([1, 0, 2, 0])
    # mass up to and including y: 0.5 + 0.3, 0.6, 0.5 + 0.3, 0.7 + 0.2 + 0.1
    scores = conformal_scores(cal, method="aps")[np.arange(4), y]
    np.testing.assert_allclose(scores, [0.8, 0.6, 0.8, 1.0])
    model = ConformalClassifier("aps", alpha=0.4).fit(cal, y)
    assert model.quantile_ == pytest.approx(0.8)  # the 3rd smallest
    assert model.predict_sets(np.array([[0.5, 0.3, 0.2]])).tolist() == [[True, True, False]]
    # randomized: the mass before y plus u p_y
    np.testing.assert_allclose(
        conformal_scores(np.array([[0.5, 0.3, 0.2]]), method="aps", u=np.array([0.5])),
        [[0.25, 0.65, 0.9]],
    )
    # ties in p: the first class ranks first
    np.testing.assert_allclose(
        conformal_scores(np.array([[0.4, 0.4, 0.2]]), method="aps"), [[0.4, 0.8, 1.0]]
    )


def test_raps_hand_worked() -> None:
    p = np.array([[0.5, 0.3, 0.2]])
    # ranks 1, 2, 3; penalty 0.1 * max(0, rank - 1)
    np.testing.assert_allclose(
        conformal_scores(p, method="raps", k_reg=1, lambda_reg=0.1), [[0.5, 0.9, 1.2]]
    )
    np.testing.assert_allclose(
        conformal_scores(p, method="raps", k_reg=2, lambda_reg=0.1), [[0.5, 0.8, 1.1]]
    )
    cal = np.array([[0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.6, 0.1, 0.3]])
    y = np.array([2, 1, 2])  # scores 1.2, 0.7, 0.9 + 0.1 = 1.0
    model = ConformalClassifier("raps", alpha=0.5, k_reg=1, lambda_reg=0.1).fit(cal, y)
    assert model.quantile_ == pytest.approx(1.0)  # rank ceil(4 * 0.5) = 2
    assert model.predict_sets(p).tolist() == [[True, True, False]]


def test_class_conditional_hand_worked() -> None:
    cal = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8], [0.45, 0.55], [0.3, 0.7]])
    y = np.array([0, 0, 0, 1, 1, 1])
    # class 0 scores 0.1, 0.4, 0.3; class 1 scores 0.2, 0.45, 0.3; alpha 0.5: rank 2 of 3
    model = ConformalClassifier("lac", alpha=0.5, class_conditional=True).fit(cal, y)
    np.testing.assert_allclose(model.class_quantiles_, [0.3, 0.3])
    sets = model.predict_sets(np.array([[0.72, 0.28], [0.4, 0.6], [0.5, 0.5]]))
    assert sets.tolist() == [[True, False], [False, False], [False, False]]


def _exchangeable(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Dirichlet probabilities and labels drawn from them: exchangeable (probs, label) pairs."""
    p = rng.dirichlet(np.ones(k) * 0.8, size=n)
    y = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return p, np.minimum(y, k - 1)


@pytest.mark.parametrize(
    ("method", "randomized", "continuous"),
    [("lac", False, True), ("aps", True, True), ("raps", True, True), ("aps", False, False)],
)
def test_marginal_coverage_by_simulation(method: str, randomized: bool, continuous: bool) -> None:
    # n = 40, alpha = 0.1: for continuous scores the expected coverage is exactly
    # ceil(41 * 0.9) / 41 = 37/41, in [1 - alpha, 1 - alpha + 1/(n + 1)] = [0.9, 0.9244].
    # Each trial's coverage has sd ~0.05 (mostly from the calibration draw), so the mean of
    # 400 trials has a standard error ~0.0025; the bounds below allow 4 standard errors.
    rng = np.random.default_rng(11)
    n, alpha, trials = 40, 0.1, 400
    coverages, sizes = [], []
    for t in range(trials):
        p, y = _exchangeable(rng, n + 200, 4)
        model = ConformalClassifier(
            method, alpha=alpha, randomized=randomized, lambda_reg=0.05, random_state=t
        ).fit(p[:n], y[:n])
        sets = model.predict_sets(p[n:])
        coverages.append(empirical_coverage(sets, y[n:]))
        sizes.append(average_set_size(sets))
    mean = float(np.mean(coverages))
    se = float(np.std(coverages) / np.sqrt(trials))
    assert mean >= 1 - alpha - 4 * se
    if continuous:
        assert mean <= 1 - alpha + 1 / (n + 1) + 4 * se
        assert mean == pytest.approx(37 / 41, abs=4 * se)
    assert 1 <= np.mean(sizes) < 4


def test_class_conditional_coverage_by_simulation() -> None:
    # per class: E[coverage] = E[ceil((n_y + 1)(1 - alpha)) / (n_y + 1)] >= 1 - alpha
    rng = np.random.default_rng(12)
    alpha, trials, k = 0.1, 300, 3
    per_class = []
    for _ in range(trials):
        p, y = _exchangeable(rng, 150 + 300, k)
        model = ConformalClassifier("lac", alpha=alpha, class_conditional=True).fit(
            p[:150], y[:150]
        )
        sets = model.predict_sets(p[150:])
        per_class.append(empirical_coverage(sets, y[150:], per_class=True))
    per_class = np.array(per_class)
    mean = np.nanmean(per_class, axis=0)
    se = np.nanstd(per_class, axis=0) / np.sqrt(trials)
    assert (mean >= 1 - alpha - 4 * se).all()
    assert (mean <= 1 - alpha + 1 / (30 + 1) + 4 * se).all()  # every class has ~50 samples


def test_coverage_and_size_functions() -> None:
    sets = np.array(
        [[True, False, False], [True, True, False], [False, False, True], [True, True, True]]
    )
    y = np.array([0, 2, 2, 1])
    assert empirical_coverage(sets, y) == pytest.approx(3 / 4)
    np.testing.assert_allclose(empirical_coverage(sets, y, per_class=True), [1.0, 1.0, 0.5])
    assert average_set_size(sets) == pytest.approx((1 + 2 + 1 + 3) / 4)
    np.testing.assert_allclose(average_set_size(sets, y, per_class=True), [1.0, 3.0, 1.5])
    absent = empirical_coverage(sets[:1], y[:1], per_class=True)
    assert absent[0] == 1.0 and np.isnan(absent[1:]).all()


def test_too_small_calibration_set_gives_full_sets_with_a_warning() -> None:
    rng = np.random.default_rng(13)
    p, y = _exchangeable(rng, 5, 3)
    with pytest.warns(UserWarning, match=r"alpha = 0.1 is below 1 / \(n \+ 1\) = 1/6 for the 5"):
        model = ConformalClassifier(alpha=0.1).fit(p, y)
    assert model.predict_sets(p).all()
    p, y = _exchangeable(rng, 60, 3)
    y[:] = 0
    y[:3] = 1  # class 1 has 3 samples, class 2 none
    with pytest.warns(UserWarning, match=r"class 1 \(n = 3\), class 2 \(n = 0\)"):
        model = ConformalClassifier(alpha=0.1, class_conditional=True).fit(p, y)
    sets = model.predict_sets(p)
    assert sets[:, 1].all() and sets[:, 2].all()


def test_randomized_sets_repeat_with_a_seed() -> None:
    rng = np.random.default_rng(14)
    p, y = _exchangeable(rng, 300, 5)
    model = ConformalClassifier("aps", randomized=True, random_state=3).fit(p[:100], y[:100])
    first = model.predict_sets(p[100:])
    np.testing.assert_array_equal(first, model.predict_sets(p[100:]))
    other = ConformalClassifier("aps", randomized=True, random_state=4).fit(p[:100], y[:100])
    assert not np.array_equal(first, other.predict_sets(p[100:]))


def test_bad_inputs() -> None:
    p = np.full((10, 2), 0.5)
    y = np.zeros(10, dtype=int)
    with pytest.raises(ConfigError, match="method: unknown 'thr'; expected one of lac, aps, raps"):
        ConformalClassifier("thr").fit(p, y)
    for alpha in (0, 1, 1.5, -0.1, "0.1", True):
        with pytest.raises(ConfigError, match="alpha: expected a number in"):
            ConformalClassifier(alpha=alpha).fit(p, y)
    with pytest.raises(ConfigError, match="k_reg"):
        ConformalClassifier("raps", k_reg=-1).fit(p, y)
    with pytest.raises(ConfigError, match="lambda_reg"):
        ConformalClassifier("raps", lambda_reg=float("nan")).fit(p, y)
    with pytest.raises(ConfigError, match="randomized: LAC has no randomized score"):
        ConformalClassifier("lac", randomized=True).fit(p, y)
    with pytest.raises(ConfigError, match="not fitted"):
        ConformalClassifier().predict_sets(p)
    with pytest.raises(DataError, match="cal_labels"):
        ConformalClassifier().fit(p, y[:4])
    with pytest.raises(DataError, match="cal_probs"):
        ConformalClassifier().fit(np.full((10, 2), 0.7), y)
    model = ConformalClassifier(alpha=0.5).fit(p, y)
    with pytest.raises(DataError, match="probs: 3 classes, but the classifier was fitted on 2"):
        model.predict_sets(np.full((4, 3), 1 / 3))
    with pytest.raises(DataError, match="sets: expected a bool array"):
        empirical_coverage(np.ones((2, 2)), np.zeros(2, dtype=int))
    with pytest.raises(ConfigError, match="labels: per_class=True needs"):
        average_set_size(np.ones((2, 2), dtype=bool), per_class=True)
    with pytest.raises(DataError, match=r"u: expected 10 numbers in \[0, 1\]"):
        conformal_scores(p, method="aps", u=np.full(10, 2.0))
    with pytest.raises(DataError, match="probs"):
        conformal_scores(np.full((3, 2), 0.7))
    before = p.copy()
    model.predict_sets(p)
    np.testing.assert_array_equal(p, before)
