"""Stacking: a meta-learner fitted on out-of-fold predictions of the members."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression

from modelfuse.arrays import check_labels
from modelfuse.calibration.cross_validation import stratified_folds
from modelfuse.calibration.softmax import to_log_probabilities
from modelfuse.ensemble.voting import Kind, check_ensemble_predictions, member_probabilities
from modelfuse.errors import ConfigError

__all__ = [
    "StackingResult",
    "aligned_predict_proba",
    "fit_stacking",
    "out_of_fold_predictions",
    "stacking_features",
]

Features = Literal["probabilities", "log_probabilities"]


def _folds(labels: np.ndarray, cv: int, random_state: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    if isinstance(cv, bool) or not isinstance(cv, (int, np.integer)) or cv < 2:
        raise ConfigError(f"cv: expected an integer number of folds >= 2, got {str(cv)[:40]!r}")
    # shuffled StratifiedKFold; every training part holds two classes at least
    return stratified_folds(labels, cv, random_state)


def aligned_predict_proba(estimator: Any, X: Any, classes: np.ndarray) -> np.ndarray:
    """``estimator.predict_proba(X)`` with columns placed at ``classes`` (zeros for absent ones).

    An estimator fitted on a fold without some class has fewer columns; this
    puts each column under its class.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.dummy import DummyClassifier
    >>> d = DummyClassifier(strategy="prior").fit([[0], [0]], [0, 2])
    >>> aligned_predict_proba(d, [[0]], np.array([0, 1, 2]))
    array([[0.5, 0. , 0.5]])
    """
    proba = np.asarray(estimator.predict_proba(X), dtype=np.float64)
    own = np.asarray(getattr(estimator, "classes_", classes))
    if own.shape == classes.shape and np.array_equal(own, classes):
        return proba
    out = np.zeros((proba.shape[0], classes.size))
    out[:, np.searchsorted(classes, own)] = proba
    return out


def out_of_fold_predictions(
    estimators: Sequence[Any],
    X: Any,
    labels: np.ndarray,
    *,
    cv: int = 5,
    random_state: int | None = None,
) -> np.ndarray:
    """Each member's out-of-fold probabilities, shape (n_models, n_samples, n_classes).

    For every fold of a shuffled ``StratifiedKFold``, a clone of each member
    is fitted on the other folds and predicts this one, so no prediction
    comes from a model that saw its sample. The members are not modified.

    Parameters
    ----------
    estimators : sequence of unfitted scikit-learn classifiers with ``predict_proba``
    X : array-like of shape (n_samples, ...)
    labels : array of shape (n_samples,), integers in [0, n_classes)
    cv : int, default 5
    random_state : int, optional
        Seeds the fold shuffle.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> X = np.arange(20.0)[:, None]; y = (X[:, 0] > 9).astype(int)
    >>> out_of_fold_predictions([LogisticRegression()], X, y, cv=2, random_state=0).shape
    (1, 20, 2)
    """
    y = np.asarray(labels)
    classes = np.arange(int(y.max()) + 1)
    X_ = np.asarray(X) if not hasattr(X, "iloc") else X
    out = np.zeros((len(estimators), y.size, classes.size))
    for train, test in _folds(y, cv, random_state):
        for m, estimator in enumerate(estimators):
            fitted = clone(estimator).fit(_rows(X_, train), y[train])
            out[m, test] = aligned_predict_proba(fitted, _rows(X_, test), classes)
    return out


def _rows(X: Any, index: np.ndarray) -> Any:
    return X.iloc[index] if hasattr(X, "iloc") else X[index]


def stacking_features(
    predictions: np.ndarray, kind: Kind, features: Features = "probabilities"
) -> np.ndarray:
    """Meta-learner inputs: the members' probabilities (or log-probabilities) side by side.

    Returns an array of shape (n_samples, n_models * n_classes), member-major.

    Examples
    --------
    >>> import numpy as np
    >>> stacking_features(np.zeros((2, 3, 4)), "logits").shape
    (3, 8)
    """
    if features not in ("probabilities", "log_probabilities"):
        raise ConfigError(
            f"features: expected 'probabilities' or 'log_probabilities', got {features!r}"
        )
    p = (
        member_probabilities(predictions, kind)
        if features == "probabilities"
        else to_log_probabilities(predictions, kind)
    )
    return np.ascontiguousarray(np.moveaxis(p, 0, 1)).reshape(p.shape[1], -1)


@dataclass(frozen=True)
class StackingResult:
    """A fitted meta-learner and its honest validation predictions.

    Attributes
    ----------
    meta_learner : classifier
        Fitted on all the given predictions.
    oof_probabilities : array of shape (n_samples, n_classes)
        Out-of-fold predictions of clones of the meta-learner: each sample
        predicted by a meta-learner that did not see it. Score these, not
        the meta-learner's predictions on its own training data.
    features : str
    """

    meta_learner: Any
    oof_probabilities: np.ndarray
    features: str


def fit_stacking(
    predictions: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    kind: Kind,
    meta_learner: Any = None,
    features: Features = "probabilities",
    cv: int = 5,
    random_state: int | None = None,
) -> StackingResult:
    """Fit a meta-learner on the members' predictions of held-out samples.

    The members must not have been trained on these samples (their
    predictions are then out-of-sample for them, e.g. the predictions of
    :func:`out_of_fold_predictions`, or of models trained elsewhere on a
    validation set). The meta-learner's own validation predictions are
    out-of-fold as well (``cv`` folds), so the reported score is honest.

    Parameters
    ----------
    predictions : array of shape (n_models, n_samples, n_classes) or a sequence
    labels : array of shape (n_samples,)
    kind : {"probabilities", "logits"}
    meta_learner : scikit-learn classifier, optional
        Any classifier with ``predict_proba``; cloned, never modified.
        Default ``LogisticRegression(max_iter=1000)``.
    features : {"probabilities", "log_probabilities"}, default "probabilities"
    cv : int, default 5
    random_state : int, optional

    Returns
    -------
    StackingResult

    References
    ----------
    Wolpert. Stacked generalization. Neural Networks, 1992.
    Ting, Witten. Issues in stacked generalization. JAIR, 1999.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> p = rng.dirichlet(np.ones(2), size=(3, 40)); y = rng.integers(0, 2, size=40)
    >>> fit_stacking(p, y, kind="probabilities", cv=2, random_state=0).oof_probabilities.shape
    (40, 2)
    """
    p = check_ensemble_predictions(predictions, kind)
    y = check_labels(labels, n_samples=p.shape[1], n_classes=p.shape[2])
    X = stacking_features(p, kind, features)
    meta = LogisticRegression(max_iter=1000) if meta_learner is None else meta_learner
    classes = np.arange(p.shape[2])
    oof = np.zeros((y.size, classes.size))
    for train, test in _folds(y, cv, random_state):
        fold_meta = clone(meta).fit(X[train], y[train])
        oof[test] = aligned_predict_proba(fold_meta, X[test], classes)
    return StackingResult(clone(meta).fit(X, y), oof, features)
