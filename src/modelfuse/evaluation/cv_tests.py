"""Comparing two learning algorithms by cross-validation: 5x2cv tests and repeated k-fold.

``paired_5x2cv`` runs Dietterich's 5x2cv paired t-test and Alpaydin's
combined 5x2cv F-test on a (5, 2) array of score differences;
``compare_estimators`` produces those differences (or repeated k-fold ones
for the corrected resampled t-test) from two scikit-learn estimators and data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from scipy.stats import f as fisher_f

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation.paired_tests import _t_pvalue, corrected_resampled_ttest
from modelfuse.evaluation.results import FiveByTwoResult, TestResult

__all__ = ["CV_SCHEMES", "compare_estimators", "paired_5x2cv"]


def paired_5x2cv(
    differences: np.ndarray, *, names: tuple[str, str] = ("a", "b")
) -> FiveByTwoResult:
    """Dietterich's 5x2cv paired t-test and Alpaydin's combined 5x2cv F-test.

    ``p_i^(j)`` is the score difference on fold ``j`` of repetition ``i``,
    ``s_i^2 = sum_j (p_i^(j) - mean_i)^2``. The t statistic is
    ``p_1^(1) / sqrt(sum_i s_i^2 / 5)`` on 5 df (two-sided); the F statistic
    is ``sum_i sum_j (p_i^(j))^2 / (2 sum_i s_i^2)`` on (10, 5) df.

    Parameters
    ----------
    differences : array of shape (5, 2)
        Score of model a minus score of model b, per repetition and fold.
    names : tuple of str

    Returns
    -------
    FiveByTwoResult
        ``.t`` and ``.f``, each a :class:`TestResult`.

    References
    ----------
    Dietterich, "Approximate statistical tests for comparing supervised
    classification learning algorithms", Neural Computation 10 (1998).
    Alpaydin, "Combined 5x2 cv F test for comparing supervised classification
    learning algorithms", Neural Computation 11 (1999).

    Examples
    --------
    >>> d = np.array([[0.02, 0.04], [0.01, 0.03], [0.03, 0.01], [0.02, 0.02], [0.0, 0.04]])
    >>> r = paired_5x2cv(d)
    >>> round(r.t.statistic, 4), round(r.f.statistic, 4)
    (1.1952, 2.2857)
    """
    p = np.asarray(differences, dtype=float)
    if p.shape != (5, 2):
        raise DataError(
            f"differences: expected shape (5, 2) (5 repetitions x 2 folds), got {p.shape}"
        )
    if not np.isfinite(p).all():
        raise DataError("differences: contains NaN or inf")
    s2 = ((p - p.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    total = s2.sum()
    if total == 0:
        raise DataError(
            "differences: the two folds of every repetition have equal differences, so the "
            "5x2cv variance estimate is 0 and the tests are undefined"
        )
    t = p[0, 0] / np.sqrt(total / 5)
    f = np.sum(p**2) / (2 * total)
    return FiveByTwoResult(
        t=TestResult(
            statistic=float(t),
            pvalue=_t_pvalue(t, 5, "two-sided"),
            method="5x2cv paired t-test",
            compared=tuple(names),
            df=5,
        ),
        f=TestResult(
            statistic=float(f),
            pvalue=float(fisher_f.sf(f, 10, 5)),
            method="combined 5x2cv F-test",
            compared=tuple(names),
            df=(10, 5),
        ),
        differences=p.copy(),
    )


CV_SCHEMES: dict[str, str] = {
    "5x2": "5 repetitions of 2-fold CV; the 5x2cv t- and F-tests",
    "10x10": "10 repetitions of 10-fold CV; the corrected resampled t-test",
}
"""Cross-validation schemes of :func:`compare_estimators`."""


def _scorer(scoring: str | Callable) -> Callable:
    from sklearn.metrics import get_scorer

    if callable(scoring):
        return scoring
    try:
        return get_scorer(scoring)
    except ValueError:
        raise ConfigError(
            f"scoring: unknown scorer {scoring!r}; use a scikit-learn scorer name such as "
            "'accuracy', 'balanced_accuracy', 'neg_log_loss', or a callable(estimator, X, y)"
        ) from None


def _fold_differences(
    a: Any,
    b: Any,
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_repeats: int,
    n_splits: int,
    scorer: Callable,
    stratify: bool,
    random_state: int | None,
) -> np.ndarray:
    from sklearn.base import clone
    from sklearn.model_selection import KFold, StratifiedKFold

    rng = np.random.default_rng(random_state)
    out = np.empty((n_repeats, n_splits))
    for i in range(n_repeats):
        seed = int(rng.integers(0, 2**31 - 1))
        splitter_cls = StratifiedKFold if stratify else KFold
        splitter = splitter_cls(n_splits=n_splits, shuffle=True, random_state=seed)
        for j, (train, test) in enumerate(splitter.split(X, y)):
            fa = clone(a).fit(X[train], y[train])
            fb = clone(b).fit(X[train], y[train])
            out[i, j] = scorer(fa, X[test], y[test]) - scorer(fb, X[test], y[test])
    return out


def compare_estimators(
    estimator_a: Any,
    estimator_b: Any,
    X: np.ndarray,
    y: np.ndarray,
    *,
    cv: Literal["5x2", "10x10"] = "5x2",
    scoring: str | Callable = "accuracy",
    stratify: bool = True,
    random_state: int | None = None,
    names: tuple[str, str] = ("a", "b"),
) -> FiveByTwoResult | TestResult:
    """Compare two scikit-learn estimators on data by a paired cross-validated test.

    Both estimators are cloned and fitted on the same training folds and
    scored on the same test folds; the score differences feed the test.

    Parameters
    ----------
    estimator_a, estimator_b : scikit-learn estimators (unfitted; they are cloned)
    X : array of shape (n_samples, n_features)
    y : array of shape (n_samples,)
    cv : {"5x2", "10x10"}
        ``"5x2"``: :func:`paired_5x2cv` (returns both tests). ``"10x10"``:
        10 repetitions of 10-fold CV and the corrected resampled t-test.
    scoring : str or callable
        A scikit-learn scorer name or ``scorer(estimator, X, y)``.
    stratify : bool
        Stratified folds (the default); ``False`` for plain shuffled folds.
    random_state : int, optional
        Seeds the fold shuffles; equal seeds give equal folds and results.
    names : tuple of str

    Returns
    -------
    FiveByTwoResult or TestResult

    References
    ----------
    Dietterich (1998); Alpaydin (1999); Nadeau and Bengio, "Inference for the
    generalization error", Machine Learning 52 (2003).

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.dummy import DummyClassifier
    >>> from sklearn.tree import DecisionTreeClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> r = compare_estimators(DecisionTreeClassifier(random_state=0), DummyClassifier(), X, y,
    ...                        random_state=0)
    >>> r.t.pvalue < 0.05 or r.f.pvalue < 0.05
    True
    """
    if cv not in CV_SCHEMES:
        raise ConfigError(f"cv: unknown scheme {cv!r}; expected one of {', '.join(CV_SCHEMES)}")
    X = np.asarray(X)
    y = np.asarray(y)
    if X.shape[0] != y.shape[0]:
        raise DataError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels; expected equal")
    scorer = _scorer(scoring)
    repeats, splits = (5, 2) if cv == "5x2" else (10, 10)
    differences = _fold_differences(
        estimator_a,
        estimator_b,
        X,
        y,
        n_repeats=repeats,
        n_splits=splits,
        scorer=scorer,
        stratify=stratify,
        random_state=random_state,
    )
    if cv == "5x2":
        return paired_5x2cv(differences, names=names)
    n = X.shape[0]
    n_test = n // splits
    return corrected_resampled_ttest(
        differences.ravel(), n_train=n - n_test, n_test=n_test, names=names
    )
