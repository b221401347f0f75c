"""The .632 and .632+ bootstrap estimators of a classifier's error rate."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation.bootstrap import RandomState, _generator
from modelfuse.evaluation.results import EstimateResult

__all__ = ["ESTIMATORS_632", "bootstrap_632"]

ESTIMATORS_632: dict[str, str] = {
    ".632": "0.368 train error + 0.632 out-of-bag error",
    ".632+": "the .632 weight raised towards 1 as the model overfits (relative overfitting R)",
    "oob": "the leave-one-out bootstrap error Err^(1) alone",
}
"""The estimators :func:`bootstrap_632` computes, by name."""


def bootstrap_632(
    estimator: Any,
    X: np.ndarray,
    y: np.ndarray,
    *,
    method: Literal[".632", ".632+", "oob"] = ".632+",
    n_resamples: int = 200,
    random_state: RandomState = None,
    name: str | None = None,
) -> EstimateResult:
    """Efron's .632 and Efron and Tibshirani's .632+ bootstrap error estimates (0-1 loss).

    ``err`` is the resubstitution error; ``Err1`` the leave-one-out bootstrap
    error (each sample's mean error over the models whose resample left it
    out, averaged over samples left out at least once);
    ``gamma = sum_k p_k (1 - q_k)`` the no-information error (``p_k``: share
    of labels equal to ``k``, ``q_k``: share of predictions equal to ``k``).
    ``.632``: ``0.368 err + 0.632 Err1``. ``.632+``: with ``Err1' =
    min(Err1, gamma)`` and ``R = (Err1' - err) / (gamma - err)`` (0 unless
    ``Err1' > err`` and ``gamma > err``, clipped to [0, 1]),
    the estimate is ``Err.632 + (Err1' - err) 0.368 0.632 R / (1 - 0.368 R)``,
    which equals ``(1 - w) err + w Err1`` with ``w = 0.632 / (1 - 0.368 R)``
    whenever ``Err1 <= gamma``.

    Parameters
    ----------
    estimator : scikit-learn classifier (unfitted; it is cloned)
    X : array of shape (n_samples, n_features)
    y : array of shape (n_samples,)
    method : {".632", ".632+", "oob"}
    n_resamples : int
    random_state : int or numpy.random.Generator, optional
    name : str, optional
        The estimator's name in the result (default: its class name).

    Returns
    -------
    EstimateResult

    References
    ----------
    Efron, "Estimating the error rate of a prediction rule: improvement on
    cross-validation", JASA 78 (1983) 316-331. Efron and Tibshirani,
    "Improvements on cross-validation: the .632+ bootstrap method", JASA 92
    (1997) 548-560.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn.tree import DecisionTreeClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> r = bootstrap_632(DecisionTreeClassifier(random_state=0), X, y, n_resamples=30,
    ...                   random_state=0)
    >>> r.train_error, 0.0 < r.statistic < 0.2
    (0.0, True)
    """
    from sklearn.base import clone

    if method not in ESTIMATORS_632:
        raise ConfigError(
            f"method: unknown estimator {method!r}; expected one of {', '.join(ESTIMATORS_632)}"
        )
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ConfigError(f"n_resamples: expected a positive integer, got {n_resamples!r}")
    X = np.asarray(X)
    y = np.asarray(y)
    if X.shape[0] != y.shape[0] or y.ndim != 1:
        raise DataError(f"X has {X.shape[0]} rows but y has shape {y.shape}; expected (n_rows,)")
    n = y.size
    if n < 3:
        raise DataError(f"y: the bootstrap needs at least 3 samples, got {n}")
    rng = _generator(random_state)

    full = clone(estimator).fit(X, y)
    fitted_predictions = full.predict(X)
    train_error = float(np.mean(fitted_predictions != y))

    errors = np.zeros(n)
    times_out = np.zeros(n)
    for _ in range(n_resamples):
        index = rng.integers(0, n, n)
        if np.unique(y[index]).size < 2:
            continue  # a one-class resample cannot train a classifier; draw the next
        out = np.ones(n, dtype=bool)
        out[index] = False
        if not out.any():
            continue
        model = clone(estimator).fit(X[index], y[index])
        errors[out] += model.predict(X[out]) != y[out]
        times_out[out] += 1
    seen = times_out > 0
    if not seen.any():
        raise DataError("no sample was ever left out of a usable resample; increase n_resamples")
    oob_error = float(np.mean(errors[seen] / times_out[seen]))

    classes = np.unique(np.concatenate([y, fitted_predictions]))
    p = np.array([np.mean(y == k) for k in classes])
    q = np.array([np.mean(fitted_predictions == k) for k in classes])
    gamma = float(np.sum(p * (1 - q)))

    capped = min(oob_error, gamma)
    if capped > train_error and gamma > train_error:
        relative = float(np.clip((capped - train_error) / (gamma - train_error), 0.0, 1.0))
    else:
        relative = 0.0
    if method == ".632":
        weight, value = 0.632, 0.368 * train_error + 0.632 * oob_error
    elif method == ".632+":
        # Efron and Tibshirani (1997), eq. 32: the .632 estimate plus a correction that
        # grows with the relative overfitting; without capping it is (1 - w) err + w Err1
        weight = 0.632 / (1 - 0.368 * relative)
        value = (0.368 * train_error + 0.632 * oob_error) + (capped - train_error) * (
            0.368 * 0.632 * relative
        ) / (1 - 0.368 * relative)
    else:
        weight, value = 1.0, oob_error
    return EstimateResult(
        statistic=float(value),
        method=method,
        compared=(name or type(estimator).__name__,),
        train_error=train_error,
        oob_error=oob_error,
        no_information_error=gamma,
        relative_overfitting=relative,
        weight=float(weight),
    )
