""".632 and .632+ against closed forms (a constant classifier, and 1-NN on pure noise)."""

import numpy as np
import pytest
from sklearn.dummy import DummyClassifier
from sklearn.neighbors import KNeighborsClassifier

from modelfuse.errors import ConfigError
from modelfuse.evaluation import bootstrap_632


def test_constant_classifier_has_equal_train_and_oob_error():
    # predicting class 0 always: every error rate is the share of class 1, R = 0
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 2))
    y = np.array([0] * 60 + [1] * 20)
    model = DummyClassifier(strategy="constant", constant=0)
    for method in (".632", ".632+", "oob"):
        r = bootstrap_632(model, X, y, method=method, n_resamples=40, random_state=0)
        assert r.train_error == pytest.approx(0.25)
        assert r.oob_error == pytest.approx(0.25)
        assert r.statistic == pytest.approx(0.25)
    # gamma = sum_k p_k (1 - q_k) with q = (1, 0): 0.75 * 0 + 0.25 * 1
    assert r.no_information_error == pytest.approx(0.25)


def test_one_nearest_neighbour_on_noise_632_is_optimistic_632plus_is_not():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 3))
    y = rng.integers(0, 2, 120)
    plain = bootstrap_632(KNeighborsClassifier(1), X, y, method=".632", n_resamples=60,
                          random_state=0)
    plus = bootstrap_632(KNeighborsClassifier(1), X, y, method=".632+", n_resamples=60,
                         random_state=0)
    assert plain.train_error == 0.0
    assert plain.statistic == pytest.approx(0.632 * plain.oob_error)
    assert abs(plain.oob_error - 0.5) < 0.08
    # no information: R near 1 and w near 1, so .632+ is near the out-of-bag error
    assert plus.relative_overfitting > 0.9
    # Efron and Tibshirani (1997), eqs. 32-34, written out
    err, err1, gamma = plus.train_error, plus.oob_error, plus.no_information_error
    capped = min(err1, gamma)
    r = plus.relative_overfitting
    expected = 0.368 * err + 0.632 * err1 + (capped - err) * 0.368 * 0.632 * r / (1 - 0.368 * r)
    assert plus.statistic == pytest.approx(expected)
    assert plus.weight == pytest.approx(0.632 / (1 - 0.368 * r))
    assert plus.statistic > plain.statistic + 0.1


def test_relative_overfitting_from_its_definition():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(150, 2))
    y = (X[:, 0] + 0.8 * rng.normal(size=150) > 0).astype(int)
    r = bootstrap_632(KNeighborsClassifier(3), X, y, n_resamples=40, random_state=0)
    capped = min(r.oob_error, r.no_information_error)
    expected = (capped - r.train_error) / (r.no_information_error - r.train_error)
    assert r.relative_overfitting == pytest.approx(np.clip(expected, 0, 1))
    assert r.train_error < r.statistic < r.no_information_error
    # no capping here (Err1 < gamma): the estimate is (1 - w) err + w Err1
    assert r.oob_error < r.no_information_error
    w = 0.632 / (1 - 0.368 * r.relative_overfitting)
    assert r.statistic == pytest.approx((1 - w) * r.train_error + w * r.oob_error)


def test_unknown_method_is_rejected():
    with pytest.raises(ConfigError, match=r"\.632, \.632\+, oob"):
        bootstrap_632(DummyClassifier(), np.zeros((5, 1)), np.array([0, 1, 0, 1, 0]),
                      method="0.632")
