"""Nested cross-validation: choose hyperparameters inside, score the choice outside.

When a merge's or an ensemble's hyperparameters (task-arithmetic lambda, TIES
density, WiSE-FT alpha, ensemble size) are chosen on the data that scores
them, the score is optimistic. Nested CV splits the data into outer folds;
for each, the candidates are compared by an inner CV on the outer training
part only, and the winner is scored once on the untouched outer test fold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation.results import NestedCVResult

__all__ = ["nested_cross_validate", "nested_cross_validation"]

FitScore = Callable[[Mapping[str, Any], np.ndarray, np.ndarray], float]


def _splits(
    n_splits: int, y: np.ndarray, positions: np.ndarray, stratify: bool, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import KFold, StratifiedKFold

    if stratify:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(positions)), y[positions])
    else:
        splitter = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(positions)))
    for train, test in parts:
        yield positions[train], positions[test]


def nested_cross_validation(
    fit_score: FitScore,
    candidates: Iterable[Mapping[str, Any]],
    y: np.ndarray,
    *,
    outer_splits: int = 5,
    inner_splits: int = 3,
    greater_is_better: bool = True,
    stratify: bool = True,
    random_state: int | None = None,
    confidence_level: float = 0.95,
) -> NestedCVResult:
    """Nested cross-validation of a selection among candidate settings.

    For each outer fold, every candidate's mean inner-validation score is
    computed with ``inner_splits``-fold CV of the outer training indices
    only; the best candidate (first among equals) is then fitted on the whole
    outer training part and scored on the outer test fold. The mean of the
    outer scores estimates the performance of the whole procedure (choosing
    included), which is what should be reported.

    Parameters
    ----------
    fit_score : callable
        ``fit_score(params, train_indices, test_indices) -> float``: fit (or
        build the merge / ensemble) with ``params`` on the training indices
        and return its score on the test indices. It is the only place the
        data are touched, so it never sees an outer test fold while choosing.
    candidates : iterable of dict
        The settings to choose among, e.g. ``[{"lam": 0.3}, {"lam": 0.5}]``
        or a ``sklearn.model_selection.ParameterGrid``.
    y : array of shape (n_samples,)
        Labels, for stratified folds (any array of length n_samples when
        ``stratify=False``).
    outer_splits, inner_splits : int
    greater_is_better : bool
    stratify : bool
    random_state : int, optional
        Seeds all fold shuffles.
    confidence_level : float
        Of the t interval over outer scores (approximate: folds share data).

    Returns
    -------
    NestedCVResult

    References
    ----------
    Varma and Simon, "Bias in error estimation when using cross-validation
    for model selection", BMC Bioinformatics 7 (2006) 91; Cawley and Talbot,
    "On over-fitting in model selection and subsequent selection bias in
    performance evaluation", JMLR 11 (2010).

    Examples
    --------
    >>> y = np.array([0, 1] * 20)
    >>> def fit_score(params, train, test):
    ...     return -abs(params["lam"] - 0.5)  # the score the data would give
    >>> r = nested_cross_validation(fit_score, [{"lam": 0.3}, {"lam": 0.5}], y, random_state=0)
    >>> [p["lam"] for p in r.best_params]
    [0.5, 0.5, 0.5, 0.5, 0.5]
    """
    settings = [dict(c) for c in candidates]
    if not settings:
        raise ConfigError("candidates: expected at least one setting to choose from, got none")
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.size == 0:
        raise DataError(f"y: expected shape (n_samples,), got {labels.shape}")
    for name, value in (("outer_splits", outer_splits), ("inner_splits", inner_splits)):
        if not isinstance(value, (int, np.integer)) or value < 2:
            raise ConfigError(f"{name}: expected an integer >= 2, got {value!r}")
    rng = np.random.default_rng(random_state)
    outer_seed = int(rng.integers(0, 2**31 - 1))
    positions = np.arange(labels.size)
    outer_scores: list[float] = []
    chosen: list[dict] = []
    inner_table: list[tuple[float, ...]] = []
    for outer_train, outer_test in _splits(outer_splits, labels, positions, stratify, outer_seed):
        inner_seed = int(rng.integers(0, 2**31 - 1))
        inner_folds = list(_splits(inner_splits, labels, outer_train, stratify, inner_seed))
        means = []
        for params in settings:
            scores = [float(fit_score(params, tr, va)) for tr, va in inner_folds]
            means.append(float(np.mean(scores)))
        values = np.array(means)
        best = int(np.argmax(values) if greater_is_better else np.argmin(values))
        chosen.append(settings[best])
        inner_table.append(tuple(means))
        outer_scores.append(float(fit_score(settings[best], outer_train, outer_test)))
    scores = np.array(outer_scores)
    mean = float(scores.mean())
    half = student_t.ppf(0.5 + confidence_level / 2, len(scores) - 1) * scores.std(ddof=1)
    half /= np.sqrt(len(scores))
    return NestedCVResult(
        statistic=mean,
        outer_scores=tuple(outer_scores),
        best_params=tuple(chosen),
        inner_scores=tuple(inner_table),
        method=f"nested CV ({outer_splits} outer x {inner_splits} inner)",
        ci=(mean - float(half), mean + float(half)),
    )


def nested_cross_validate(
    estimator: Any,
    param_grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    X: np.ndarray,
    y: np.ndarray,
    *,
    scoring: str | Callable = "accuracy",
    outer_splits: int = 5,
    inner_splits: int = 3,
    stratify: bool = True,
    random_state: int | None = None,
) -> NestedCVResult:
    """Nested cross-validation of a scikit-learn estimator over a parameter grid.

    A thin wrapper of :func:`nested_cross_validation` that clones the
    estimator, sets each candidate's parameters, fits on the training rows
    and scores on the test rows (higher scores are better, as scikit-learn
    scorers are).

    Parameters
    ----------
    estimator : scikit-learn estimator
        E.g. a ``VotingEnsemble`` whose weights or size are being chosen.
    param_grid : dict of lists, or list of dicts
        As ``sklearn.model_selection.ParameterGrid`` accepts.
    X : array of shape (n_samples, n_features)
    y : array of shape (n_samples,)
    scoring : str or callable
        A scikit-learn scorer name or ``scorer(estimator, X, y)``.
    outer_splits, inner_splits, stratify, random_state
        As in :func:`nested_cross_validation`.

    Returns
    -------
    NestedCVResult

    References
    ----------
    Varma and Simon (2006); Cawley and Talbot (2010).

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.neighbors import KNeighborsClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> r = nested_cross_validate(KNeighborsClassifier(), {"n_neighbors": [1, 15]}, X, y,
    ...                           random_state=0)
    >>> 0.8 < r.statistic <= 1.0
    True
    """
    from sklearn.base import clone
    from sklearn.model_selection import ParameterGrid

    from modelfuse.evaluation.cv_tests import _scorer

    scorer = _scorer(scoring)
    X = np.asarray(X)
    y = np.asarray(y)
    if X.shape[0] != y.shape[0]:
        raise DataError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels; expected equal")

    def fit_score(params: Mapping[str, Any], train: np.ndarray, test: np.ndarray) -> float:
        model = clone(estimator).set_params(**params).fit(X[train], y[train])
        return float(scorer(model, X[test], y[test]))

    return nested_cross_validation(
        fit_score,
        ParameterGrid(param_grid),
        y,
        outer_splits=outer_splits,
        inner_splits=inner_splits,
        stratify=stratify,
        random_state=random_state,
    )
