"""5x2cv t- and F-tests by hand, their null behaviour, and compare_estimators' folds."""

import numpy as np
import pytest
from scipy import stats
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import load_breast_cancer
from sklearn.dummy import DummyClassifier
from sklearn.naive_bayes import GaussianNB
from sklearn.tree import DecisionTreeClassifier

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation import compare_estimators, paired_5x2cv
from modelfuse.evaluation.results import FiveByTwoResult, TestResult

HAND = np.array([[0.02, 0.04], [0.01, 0.03], [0.03, 0.01], [0.02, 0.02], [0.0, 0.04]])


def test_5x2cv_hand_worked():
    # s_i^2 = (p1 - p2)^2 / 2: 0.0002, 0.0002, 0.0002, 0, 0.0008 -> sum 0.0014
    # t = 0.02 / sqrt(0.0014 / 5); F = sum p^2 / (2 * 0.0014) = 0.0064 / 0.0028
    r = paired_5x2cv(HAND, names=("x", "y"))
    t = 0.02 / np.sqrt(0.0014 / 5)
    f = 0.0064 / 0.0028
    assert r.t.statistic == pytest.approx(t)
    assert r.f.statistic == pytest.approx(f)
    assert r.t.pvalue == pytest.approx(2 * stats.t.sf(t, 5))
    assert r.f.pvalue == pytest.approx(stats.f.sf(f, 10, 5))
    assert r.t.df == 5 and r.f.df == (10, 5)
    assert r.t.compared == ("x", "y")
    assert "5x2cv paired t-test" in str(r) and "\n" not in str(r)


def test_5x2cv_t_pvalues_near_uniform_and_f_conservative_under_the_null():
    rng = np.random.default_rng(0)
    results = [paired_5x2cv(rng.normal(size=(5, 2))) for _ in range(1500)]
    t_p = np.array([r.t.pvalue for r in results])
    f_p = np.array([r.f.pvalue for r in results])
    assert stats.kstest(t_p, "uniform").pvalue > 0.001
    # Alpaydin's F-test is conservative: it rejects at most at the nominal rate
    assert np.mean(f_p < 0.05) <= 0.06


def test_5x2cv_rejects_bad_shapes_and_zero_variance():
    with pytest.raises(DataError, match=r"\(5, 2\)"):
        paired_5x2cv(np.zeros((5, 3)))
    with pytest.raises(DataError, match="variance"):
        paired_5x2cv(np.ones((5, 2)))


class _Recorder(BaseEstimator, ClassifierMixin):
    """Logs the training rows (their first feature holds the row id)."""

    log: list = []

    def fit(self, X, y):
        _Recorder.log.append(X[:, 0].astype(int).copy())
        self.classes_ = np.unique(y)
        return self

    def predict(self, X):
        return (X[:, 1] > 0).astype(int)


def test_compare_estimators_uses_stratified_halves_seeded():
    rng = np.random.default_rng(0)
    y = np.array([0] * 60 + [1] * 40)
    X = np.column_stack([np.arange(100), rng.normal(size=100)])
    _Recorder.log = []
    r = compare_estimators(_Recorder(), DummyClassifier(), X, y, random_state=3)
    assert isinstance(r, FiveByTwoResult)
    assert len(_Recorder.log) == 10  # 5 repetitions x 2 folds
    for i in range(5):
        first, second = _Recorder.log[2 * i], _Recorder.log[2 * i + 1]
        assert len(first) == len(second) == 50
        assert set(first) | set(second) == set(range(100)) and not set(first) & set(second)
        assert np.sum(y[first] == 1) == 20  # stratified: 40% of the half
    repetitions = {tuple(sorted(_Recorder.log[2 * i])) for i in range(5)}
    assert len(repetitions) == 5  # every repetition shuffles differently


def test_compare_estimators_is_reproducible_and_finds_a_real_difference():
    X, y = load_breast_cancer(return_X_y=True)
    X = X[:, :5]
    kwargs = dict(random_state=0, names=("tree", "dummy"))
    one = compare_estimators(DecisionTreeClassifier(max_depth=3, random_state=0),
                             DummyClassifier(), X, y, **kwargs)
    two = compare_estimators(DecisionTreeClassifier(max_depth=3, random_state=0),
                             DummyClassifier(), X, y, **kwargs)
    np.testing.assert_array_equal(one.differences, two.differences)
    assert one.t.pvalue < 0.01 and one.f.pvalue < 0.01
    assert (one.differences > 0).all()


def test_compare_estimators_repeated_kfold_uses_the_corrected_ttest():
    X, y = load_breast_cancer(return_X_y=True)
    X = X[:200, :4]
    y = y[:200]
    r = compare_estimators(GaussianNB(), DummyClassifier(), X, y,
                           cv="10x10", random_state=0)
    assert isinstance(r, TestResult)
    assert r.df == 99 and "Nadeau-Bengio" in r.method


def test_compare_estimators_bad_input():
    X = np.zeros((10, 2))
    with pytest.raises(ConfigError, match="5x2, 10x10"):
        compare_estimators(DummyClassifier(), DummyClassifier(), X, np.zeros(10), cv="3x3")
    with pytest.raises(DataError, match="rows"):
        compare_estimators(DummyClassifier(), DummyClassifier(), X, np.zeros(9))
    with pytest.raises(ConfigError, match="scorer"):
        compare_estimators(DummyClassifier(), DummyClassifier(), X, np.zeros(10),
                           scoring="no_such_score")
