"""scikit-learn-style ensembles of fitted models: voting, Caruana selection, stacking.

Members are prefit classifiers (their ``predict_proba`` is used) or callables
``f(X) -> array (n_samples, n_classes)`` returning ``member_kind``
predictions. Prefit members are treated as frozen, as
``sklearn.frozen.FrozenEstimator`` is: ``clone`` of an ensemble keeps the
same member objects (it clones every other parameter), so a cloned ensemble
is unfitted but its members stay usable. Nothing here modifies a member.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted

from modelfuse.calibration.softmax import to_probabilities
from modelfuse.ensemble.selection import SelectionMetric, SelectionResult, caruana_selection
from modelfuse.ensemble.stacking import (
    Features,
    aligned_predict_proba,
    out_of_fold_predictions,
    stacking_features,
)
from modelfuse.ensemble.voting import Kind, check_ensemble_predictions, check_weights, soft_vote
from modelfuse.ensemble.weights import learn_weights
from modelfuse.errors import ConfigError, DataError

__all__ = ["SelectionEnsemble", "StackingEnsemble", "VotingEnsemble"]


class _MemberEnsemble(ClassifierMixin, BaseEstimator):
    """Shared plumbing: member predictions, label encoding, frozen-member cloning."""

    estimators: Sequence[Any]
    member_kind: Kind

    def __sklearn_clone__(self) -> _MemberEnsemble:
        params = self.get_params(deep=False)
        members = params.pop("estimators")
        cloned = {key: clone(value, safe=False) for key, value in params.items()}
        return type(self)(estimators=list(members), **cloned)

    def _check_members(self) -> list[Any]:
        members = list(self.estimators) if self.estimators is not None else []
        if not members:
            raise ConfigError("estimators: expected a non-empty list of fitted models or callables")
        for i, member in enumerate(members):
            if not (hasattr(member, "predict_proba") or callable(member)):
                raise ConfigError(
                    f"estimators[{i}]: {type(member).__name__} has no predict_proba and is not "
                    "callable; give a fitted classifier or a function X -> predictions"
                )
        return members

    def _member_probabilities(self, members: Sequence[Any], X: Any) -> np.ndarray:
        """(n_models, n_samples, n_classes) probabilities of the members on ``X``."""
        out = []
        for i, member in enumerate(members):
            if hasattr(member, "predict_proba"):
                out.append(np.asarray(member.predict_proba(X)))
            else:
                raw = check_ensemble_predictions(
                    [np.asarray(member(X))], self.member_kind, sources=[f"estimators[{i}](X)"]
                )[0]
                out.append(to_probabilities(raw, self.member_kind))
        names = [f"estimators[{i}]" for i in range(len(out))]
        return check_ensemble_predictions(out, "probabilities", sources=names)

    def _encode(self, members: Sequence[Any], y: Any, n_columns: int) -> np.ndarray:
        """Set ``classes_`` (the members' own when they have it) and return 0-based labels."""
        y = np.asarray(y)
        classes = next((np.asarray(m.classes_) for m in members if hasattr(m, "classes_")), None)
        if classes is None:
            classes = np.unique(y) if np.unique(y).size == n_columns else np.arange(n_columns)
        if classes.size != n_columns:
            raise DataError(
                f"estimators: predict {n_columns} classes but classes_ has {classes.size}"
            )
        position = np.searchsorted(classes, y)
        position = np.clip(position, 0, classes.size - 1)
        if not np.array_equal(classes[position], y):
            raise DataError(
                f"y: labels {sorted(set(np.unique(y)) - set(classes))} are not among the "
                f"members' classes {classes.tolist()}"
            )
        self.classes_ = classes
        return position

    def predict(self, X: Any) -> np.ndarray:
        """The class of largest ensemble probability."""
        proba = self.predict_proba(X)  # raises NotFittedError first
        return self.classes_[proba.argmax(axis=1)]


class VotingEnsemble(_MemberEnsemble):
    """Weighted soft voting over fitted members.

    Parameters
    ----------
    estimators : list
        Prefit classifiers or callables (see the module docstring).
    weights : array of shape (n_models,), "learned" or None
        Fixed weights, weights learned on ``fit``'s data by minimising NLL
        on the simplex (:func:`~modelfuse.ensemble.weights.learn_weights`),
        or uniform.
    average : {"probabilities", "logits"}, default "probabilities"
        See :func:`~modelfuse.ensemble.voting.soft_vote`.
    member_kind : {"probabilities", "logits"}, default "probabilities"
        What callables return.

    Attributes
    ----------
    weights_ : array of shape (n_models,)
    classes_ : array

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.naive_bayes import GaussianNB
    >>> X, y = load_iris(return_X_y=True)
    >>> members = [LogisticRegression(max_iter=500).fit(X, y), GaussianNB().fit(X, y)]
    >>> VotingEnsemble(members).fit(X, y).predict_proba(X[:2]).shape
    (2, 3)
    """

    def __init__(
        self,
        estimators: Sequence[Any],
        *,
        weights: np.ndarray | Sequence[float] | Literal["learned"] | None = None,
        average: Literal["probabilities", "logits"] = "probabilities",
        member_kind: Kind = "probabilities",
    ) -> None:
        self.estimators = estimators
        self.weights = weights
        self.average = average
        self.member_kind = member_kind

    def fit(self, X: Any, y: Any) -> VotingEnsemble:
        """Set the classes and, with ``weights="learned"``, learn the weights on ``(X, y)``."""
        members = self._check_members()
        p = self._member_probabilities(members, X)
        labels = self._encode(members, y, p.shape[2])
        if isinstance(self.weights, str):
            if self.weights != "learned":
                raise ConfigError(
                    f"weights: expected an array, 'learned' or None, got {self.weights!r}"
                )
            self.weights_ = learn_weights(p, labels, kind="probabilities")
        else:
            self.weights_ = check_weights(self.weights, len(members))
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Weighted average of the members' probabilities, shape (n_samples, n_classes)."""
        check_is_fitted(self)
        p = self._member_probabilities(self._check_members(), X)
        return soft_vote(p, kind="probabilities", weights=self.weights_, average=self.average)


class SelectionEnsemble(_MemberEnsemble):
    """Caruana ensemble selection over fitted members, on ``fit``'s validation data.

    Parameters
    ----------
    estimators : list
        Prefit classifiers or callables.
    n_rounds, metric, n_init, n_bags, bag_fraction, random_state
        See :func:`~modelfuse.ensemble.selection.caruana_selection`.
    member_kind : {"probabilities", "logits"}, default "probabilities"

    Attributes
    ----------
    weights_ : array of shape (n_models,)
    selection_ : SelectionResult
    classes_ : array

    References
    ----------
    Caruana, Niculescu-Mizil, Crew, Ksikes. Ensemble selection from libraries
    of models. ICML 2004.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.naive_bayes import GaussianNB
    >>> X, y = load_iris(return_X_y=True)
    >>> members = [LogisticRegression(max_iter=500).fit(X, y), GaussianNB().fit(X, y)]
    >>> float(SelectionEnsemble(members, random_state=0).fit(X, y).weights_.sum())
    1.0
    """

    def __init__(
        self,
        estimators: Sequence[Any],
        *,
        n_rounds: int = 25,
        metric: SelectionMetric = "nll",
        n_init: int = 0,
        n_bags: int = 0,
        bag_fraction: float = 0.5,
        random_state: int | None = None,
        member_kind: Kind = "probabilities",
    ) -> None:
        self.estimators = estimators
        self.n_rounds = n_rounds
        self.metric = metric
        self.n_init = n_init
        self.n_bags = n_bags
        self.bag_fraction = bag_fraction
        self.random_state = random_state
        self.member_kind = member_kind

    def fit(self, X: Any, y: Any) -> SelectionEnsemble:
        """Select members on held-out ``(X, y)`` (not the members' training data)."""
        members = self._check_members()
        p = self._member_probabilities(members, X)
        labels = self._encode(members, y, p.shape[2])
        result: SelectionResult = caruana_selection(
            p,
            labels,
            kind="probabilities",
            n_rounds=self.n_rounds,
            metric=self.metric,
            n_init=self.n_init,
            n_bags=self.n_bags,
            bag_fraction=self.bag_fraction,
            random_state=self.random_state,
        )
        self.selection_ = result
        self.weights_ = result.weights
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """The selected weighted average, shape (n_samples, n_classes)."""
        check_is_fitted(self)
        p = self._member_probabilities(self._check_members(), X)
        return soft_vote(p, kind="probabilities", weights=self.weights_)


class StackingEnsemble(_MemberEnsemble):
    """Stacking: a meta-learner on the members' out-of-fold predictions.

    Parameters
    ----------
    estimators : list
        With ``cv="prefit"``: fitted classifiers or callables, and ``fit``'s
        data must be held out from their training. With an integer ``cv``:
        unfitted scikit-learn classifiers; ``fit`` computes their
        out-of-fold predictions (clones fitted on the other folds), fits the
        meta-learner on those, then refits clones on all the data
        (``estimators_``). The given estimators are never modified.
    final_estimator : classifier, optional
        Any scikit-learn classifier with ``predict_proba``; default
        ``LogisticRegression(max_iter=1000)``.
    cv : int or "prefit", default 5
    features : {"probabilities", "log_probabilities"}, default "probabilities"
    random_state : int, optional
        Seeds the folds.
    member_kind : {"probabilities", "logits"}, default "probabilities"

    Attributes
    ----------
    estimators_ : list
        The members used for prediction.
    final_estimator_ : classifier
    classes_ : array

    References
    ----------
    Wolpert. Stacked generalization. Neural Networks, 1992.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.naive_bayes import GaussianNB
    >>> from sklearn.tree import DecisionTreeClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> ens = StackingEnsemble([GaussianNB(), DecisionTreeClassifier(random_state=0)], cv=3)
    >>> ens.fit(X, y).predict(X[:3])
    array([0, 0, 0])
    """

    def __init__(
        self,
        estimators: Sequence[Any],
        *,
        final_estimator: Any = None,
        cv: int | Literal["prefit"] = 5,
        features: Features = "probabilities",
        random_state: int | None = None,
        member_kind: Kind = "probabilities",
    ) -> None:
        self.estimators = estimators
        self.final_estimator = final_estimator
        self.cv = cv
        self.features = features
        self.random_state = random_state
        self.member_kind = member_kind

    def fit(self, X: Any, y: Any) -> StackingEnsemble:
        """Fit the meta-learner on out-of-fold (or held-out, for prefit) member predictions."""
        members = self._check_members()
        meta = self.final_estimator
        if meta is None:
            meta = LogisticRegression(max_iter=1000)
        if self.cv == "prefit":
            p = self._member_probabilities(members, X)
            labels = self._encode(members, y, p.shape[2])
            fitted = members
        else:
            for i, member in enumerate(members):
                if not hasattr(member, "fit"):
                    raise ConfigError(
                        f"estimators[{i}]: a callable cannot be refitted on folds; "
                        "use cv='prefit' with held-out data"
                    )
            classes, labels = np.unique(np.asarray(y), return_inverse=True)
            p = out_of_fold_predictions(
                members, X, labels, cv=self.cv, random_state=self.random_state
            )
            fitted = [clone(member).fit(X, labels) for member in members]
            self.classes_ = classes
        features = stacking_features(p, "probabilities", self.features)
        self.final_estimator_ = clone(meta).fit(features, labels)
        self.estimators_ = fitted
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """The meta-learner's probabilities, shape (n_samples, n_classes)."""
        check_is_fitted(self)
        p = self._member_probabilities(self.estimators_, X)
        features = stacking_features(p, "probabilities", self.features)
        return aligned_predict_proba(self.final_estimator_, features, np.arange(self.classes_.size))
