"""Stacking: out-of-fold predictions only (a leakage test with a memorising member)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression

from modelfuse.ensemble.stacking import (
    fit_stacking,
    out_of_fold_predictions,
    stacking_features,
)
from modelfuse.ensemble.wrappers import StackingEnsemble


class Memoriser(ClassifierMixin, BaseEstimator):
    """Predicts the true label with certainty for rows it was fitted on, uniform otherwise.

    Its first feature is a row id, so it can tell a training row from a new one.
    """

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        self.seen_ = {int(i): int(label) for i, label in zip(X[:, 0], y, strict=True)}
        return self

    def predict_proba(self, X):
        out = np.full((len(X), self.classes_.size), 1.0 / self.classes_.size)
        for row, i in enumerate(X[:, 0]):
            if int(i) in self.seen_:
                out[row] = 0.0
                out[row, np.searchsorted(self.classes_, self.seen_[int(i)])] = 1.0
        return out


def _data(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    X = np.column_stack([np.arange(n), rng.normal(size=n) + labels])
    return X, labels


def test_out_of_fold_predictions_never_come_from_a_model_that_saw_the_row() -> None:
    X, y = _data()
    oof = out_of_fold_predictions([Memoriser()], X, y, cv=4, random_state=0)
    # had any row leaked, the memoriser would have predicted it with certainty
    np.testing.assert_allclose(oof[0], 1 / 3)


def test_stacking_ensemble_fits_its_meta_learner_on_out_of_fold_predictions() -> None:
    X, y = _data()

    class Spy(LogisticRegression):
        def fit(self, X, y, sample_weight=None):
            Spy.seen = np.array(X)
            return super().fit(X, y, sample_weight)

    ens = StackingEnsemble([Memoriser()], final_estimator=Spy(), cv=4, random_state=0).fit(X, y)
    # the meta-learner saw only uniform rows: nothing from a model trained on that row
    np.testing.assert_allclose(Spy.seen, 1 / 3)
    # after fitting, the refitted member memorised all rows, as a final model should
    assert len(ens.estimators_[0].seen_) == len(y)


def test_in_sample_stacking_would_have_leaked() -> None:
    # The contrast that makes the test above meaningful: in-sample predictions are certain.
    X, y = _data()
    in_sample = Memoriser().fit(X, y).predict_proba(X)
    assert in_sample.max(axis=1).min() == 1.0


def test_fit_stacking_reports_out_of_fold_meta_predictions() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=400)
    informative = np.where(np.eye(2)[y] == 1, 0.7, 0.3)
    noise = rng.dirichlet(np.ones(2), size=400)
    result = fit_stacking([informative, noise], y, kind="probabilities", cv=5, random_state=0)
    assert result.oof_probabilities.shape == (400, 2)
    accuracy = (result.oof_probabilities.argmax(axis=1) == y).mean()
    assert accuracy == 1.0
    # the final meta-learner is the one fitted on all rows of the features
    features = stacking_features(np.stack([informative, noise]), "probabilities")
    reference = LogisticRegression(max_iter=1000).fit(features, y)
    np.testing.assert_allclose(result.meta_learner.coef_, reference.coef_)


def test_stacking_features_are_member_major() -> None:
    p = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2)
    f = stacking_features(p, "probabilities")
    np.testing.assert_array_equal(f[0], [0, 1, 6, 7])


def test_a_callable_cannot_be_refitted_on_folds() -> None:
    from modelfuse.errors import ConfigError

    X, y = _data()
    with pytest.raises(ConfigError, match="cv='prefit'"):
        StackingEnsemble([lambda X: np.full((len(X), 3), 1 / 3)], cv=3).fit(X, y)
