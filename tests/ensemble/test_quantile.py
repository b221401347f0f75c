"""Quantile ensembles: the weighted average, both monotone repairs, conformal coverage."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from modelfuse.ensemble.quantile import QuantileEnsemble, combine_quantiles, conformal_margin
from modelfuse.errors import ConfigError, DataError

LEVELS = [0.05, 0.25, 0.5, 0.75, 0.95]


def test_weighted_average_and_sorting() -> None:
    a = np.array([[[0.0, 1.0, 2.0, 3.0, 4.0]]])
    b = np.array([[[4.0, 3.0, 2.0, 1.0, 0.0]]])
    p = np.concatenate([a, b])
    # weights 3:1 -> 0.75 a + 0.25 b = [1, 1.5, 2, 2.5, 3]: already monotone
    np.testing.assert_allclose(combine_quantiles(p, LEVELS, weights=[3, 1]), [[1, 1.5, 2, 2.5, 3]])
    # weights 1:3 -> [3, 2.5, 2, 1.5, 1]: crossing; sorting gives [1, 1.5, 2, 2.5, 3]
    np.testing.assert_allclose(combine_quantiles(p, LEVELS, weights=[1, 3]), [[1, 1.5, 2, 2.5, 3]])
    # isotonic regression of a decreasing row is its mean everywhere
    np.testing.assert_allclose(
        combine_quantiles(p, LEVELS, weights=[1, 3], monotone="isotonic"), [[2.0] * 5]
    )


def test_isotonic_repair_matches_sklearn_row_by_row() -> None:
    rng = np.random.default_rng(0)
    p = np.sort(rng.normal(size=(3, 100, 5)), axis=2) + rng.normal(scale=0.5, size=(3, 100, 5))
    got = combine_quantiles(p, LEVELS, monotone="isotonic")
    mean = p.mean(axis=0)
    for i in range(100):
        ref = IsotonicRegression().fit_transform(np.arange(5), mean[i])
        np.testing.assert_allclose(got[i], ref, atol=1e-12)
    assert (np.diff(got, axis=1) >= -1e-12).all()


def test_conformal_interval_covers_at_the_nominal_rate() -> None:
    rng = np.random.default_rng(1)
    coverage = []
    for _ in range(200):
        y_cal, y_test = rng.normal(size=300), rng.normal(size=300)
        # members predict a too narrow N(0, 0.5) interval for N(0, 1) data
        members = np.tile([-0.8, -0.3, 0.0, 0.3, 0.8], (2, 300, 1)) * 0.5 * 1.2
        ens = QuantileEnsemble(LEVELS, alpha=0.1).fit(members, y_cal)
        lo, hi = ens.predict_interval(members).T
        coverage.append(((y_test >= lo) & (y_test <= hi)).mean())
    # split conformal: E[coverage] >= 1 - alpha and <= 1 - alpha + 1 / (n + 1)
    assert 0.895 <= np.mean(coverage) <= 0.91


def test_conformal_margin_by_hand() -> None:
    lower, upper = np.zeros(4), np.ones(4)
    y = np.array([0.5, 2.0, -1.0, 3.0])  # scores: -0.5, 1, 1, 2
    assert conformal_margin(lower, upper, y, alpha=0.5) == 1.0  # ceil(5 * 0.5) = 3rd smallest
    assert conformal_margin(lower, upper, y, alpha=0.2) == 2.0  # 4th smallest
    assert conformal_margin(lower, upper, y, alpha=0.1) == np.inf  # ceil(4.5) = 5 > n


def test_bad_quantile_inputs() -> None:
    with pytest.raises(ConfigError, match="levels"):
        combine_quantiles(np.zeros((1, 2, 2)), [0.9, 0.1])
    with pytest.raises(DataError, match="2 levels"):
        combine_quantiles(np.zeros((1, 2, 3)), [0.1, 0.9])
    with pytest.raises(DataError, match="NaN"):
        combine_quantiles(np.full((1, 2, 2), np.nan), [0.1, 0.9])
    with pytest.raises(ConfigError, match="interval"):
        QuantileEnsemble(LEVELS, interval=(0.1, 0.9)).fit(np.zeros((1, 3, 5)), np.zeros(3))
