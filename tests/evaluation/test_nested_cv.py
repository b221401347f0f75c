"""Nested CV: the selection never sees the outer test fold (a marker test), and it is unbiased."""

import numpy as np
import pytest
from sklearn.datasets import load_wine
from sklearn.neighbors import KNeighborsClassifier

from modelfuse.errors import ConfigError
from modelfuse.evaluation import nested_cross_validate, nested_cross_validation


def test_selection_never_sees_the_outer_test_fold():
    n, outer, inner = 60, 4, 3
    y = np.array([0, 1, 2] * 20)
    candidates = [{"lam": 0.2}, {"lam": 0.5}, {"lam": 0.8}]
    calls = []

    def fit_score(params, train, test):
        calls.append((params["lam"], set(train.tolist()), set(test.tolist())))
        return -abs(params["lam"] - 0.5) + 0.01 * len(test)

    result = nested_cross_validation(
        fit_score, candidates, y, outer_splits=outer, inner_splits=inner, random_state=0
    )
    per_fold = len(candidates) * inner + 1
    assert len(calls) == outer * per_fold
    outer_tests = []
    for k in range(outer):
        block = calls[k * per_fold : (k + 1) * per_fold]
        selection, final = block[:-1], block[-1]
        marked = final[2]  # the outer test fold: the marker
        outer_tests.append(marked)
        seen = set().union(*(tr | te for _, tr, te in selection))
        assert not seen & marked  # the inner loop never touched a marked sample
        assert seen == final[1]  # it used exactly the outer training part
        assert final[1].isdisjoint(marked) and len(final[1] | marked) == n
    # the outer test folds partition the data
    assert set().union(*outer_tests) == set(range(n))
    assert sum(len(t) for t in outer_tests) == n
    assert [p["lam"] for p in result.best_params] == [0.5] * outer


def test_nested_estimate_is_honest_where_plain_selection_is_optimistic():
    # 60 candidates that guess at random: choosing the best on the data that scores it
    # looks better than chance; nested CV reports chance
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    guesses = rng.integers(0, 2, size=(60, n))
    candidates = [{"guess": g} for g in range(60)]

    def fit_score(params, train, test):
        return float(np.mean(guesses[params["guess"]][test] == y[test]))

    plain_best = max(fit_score(c, np.arange(n), np.arange(n)) for c in candidates)
    nested = nested_cross_validation(fit_score, candidates, y, random_state=0)
    assert plain_best >= 0.57
    assert abs(nested.statistic - 0.5) < 0.06
    assert nested.statistic < plain_best - 0.04


def test_losses_choose_the_minimum_and_results_are_seeded():
    y = np.array([0, 1] * 15)

    def fit_score(params, train, test):
        return (params["a"] - 2) ** 2

    r = nested_cross_validation(
        fit_score, [{"a": 1}, {"a": 2}, {"a": 4}], y, greater_is_better=False, random_state=1,
        outer_splits=3,
    )
    assert [p["a"] for p in r.best_params] == [2, 2, 2]
    assert r.statistic == 0.0
    assert len(r.inner_scores) == 3 and r.inner_scores[0] == (1.0, 0.0, 4.0)


def test_sklearn_wrapper_chooses_from_the_grid_reproducibly():
    X, y = load_wine(return_X_y=True)
    grid = {"n_neighbors": [1, 5, 25]}
    one = nested_cross_validate(KNeighborsClassifier(), grid, X, y, random_state=0)
    two = nested_cross_validate(KNeighborsClassifier(), grid, X, y, random_state=0)
    assert one.outer_scores == two.outer_scores
    assert all(p["n_neighbors"] in (1, 5, 25) for p in one.best_params)
    assert one.ci[0] < one.statistic < one.ci[1]
    assert "nested CV (5 outer x 3 inner)" in str(one)


def test_bad_settings_are_rejected():
    y = np.zeros(10)
    with pytest.raises(ConfigError, match="at least one setting"):
        nested_cross_validation(lambda p, a, b: 0.0, [], y)
    with pytest.raises(ConfigError, match="outer_splits"):
        nested_cross_validation(lambda p, a, b: 0.0, [{}], y, outer_splits=1)


def test_sklearn_wrapper_never_fits_or_scores_a_marked_row_while_choosing():
    # column 0 carries each row's id: the marker the estimator and the scorer log
    from sklearn.base import BaseEstimator, ClassifierMixin

    log = []

    class Logger(BaseEstimator, ClassifierMixin):
        def __init__(self, k=1):
            self.k = k

        def fit(self, X, y):
            log.append(("fit", self.k, set(X[:, 0].astype(int))))
            self.classes_ = np.unique(y)
            return self

        def predict(self, X):
            return np.zeros(len(X), dtype=int)

    def scorer(model, X, y):
        log.append(("score", model.k, set(X[:, 0].astype(int))))
        return float(model.k == 2)

    rng = np.random.default_rng(0)
    n = 48
    X = np.column_stack([np.arange(n), rng.normal(size=n)])
    y = np.array([0, 1] * (n // 2))
    r = nested_cross_validate(Logger(), {"k": [1, 2, 3]}, X, y, scoring=scorer,
                              outer_splits=4, inner_splits=2, random_state=0)
    per_fold = 2 * (3 * 2 + 1)  # a fit and a score per inner split and candidate, then outer
    assert len(log) == 4 * per_fold
    for f in range(4):
        block = log[f * per_fold : (f + 1) * per_fold]
        outer_fit, outer_score = block[-2], block[-1]
        marked = outer_score[2]
        chosen = set().union(*(ids for _, _, ids in block[:-2]))
        assert not chosen & marked
        assert outer_fit[2] == chosen and not outer_fit[2] & marked
    assert [p["k"] for p in r.best_params] == [2, 2, 2, 2]
