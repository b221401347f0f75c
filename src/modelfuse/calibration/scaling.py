"""Temperature, vector and matrix scaling: affine maps of the logits fitted on NLL.

One implementation, :func:`fit_logit_scaling`, fits any of the three by
L-BFGS (``scipy.optimize.minimize(method="L-BFGS-B")``) on the mean negative
log-likelihood with its analytic gradient, in float64. The estimators are
thin wrappers around it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.optimize import minimize

from modelfuse.calibration.base import Calibrator, Kind
from modelfuse.calibration.softmax import softmax, to_log_probabilities
from modelfuse.errors import ConfigError

__all__ = [
    "MatrixScaling",
    "TemperatureScaling",
    "VectorScaling",
    "apply_logit_scaling",
    "fit_logit_scaling",
]

Parametrisation = Literal["temperature", "vector", "matrix"]
_PARAMETRISATIONS = ("temperature", "vector", "matrix")


def _unpack(theta: np.ndarray, form: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(coef, intercept): a scalar 1/T, a vector, or a (k, k) matrix, and the bias."""
    if form == "temperature":
        return np.exp(-theta[:1]), np.zeros(k)
    if form == "vector":
        return theta[:k], theta[k:]
    return theta[: k * k].reshape(k, k), theta[k * k :]


def apply_logit_scaling(logits: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Scaled logits: ``z @ coef.T + b`` for a matrix ``coef``, ``coef * z + b`` otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> apply_logit_scaling(np.array([[2.0, 4.0]]), np.array([0.5]), np.zeros(2))
    array([[1., 2.]])
    """
    coef = np.asarray(coef)
    if coef.ndim == 2:
        return logits @ coef.T + intercept
    return logits * coef + intercept


def fit_logit_scaling(
    logits: np.ndarray,
    labels: np.ndarray,
    parametrisation: Parametrisation,
    *,
    max_iter: int = 500,
    tol: float = 1e-10,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit an affine map of the logits by L-BFGS on the mean NLL.

    Parameters
    ----------
    logits : array of shape (n_samples, n_classes), float64
    labels : array of shape (n_samples,), integers in [0, n_classes)
    parametrisation : {"temperature", "vector", "matrix"}
        ``z / T`` (optimised over ``log T``, so ``T > 0``), ``w * z + b``, or
        ``W z + b``. Starts from the identity map.
    max_iter, tol : int, float
        Passed to L-BFGS-B (``maxiter``, ``gtol``/``ftol``).

    Returns
    -------
    coef, intercept : arrays
        ``coef`` is ``[1 / T]``, ``w`` or ``W``; see :func:`apply_logit_scaling`.

    References
    ----------
    Guo, Pleiss, Sun, Weinberger. On calibration of modern neural networks.
    ICML 2017.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    >>> coef, _ = fit_logit_scaling(z, np.array([0, 1, 1, 1]), "temperature")
    >>> bool(coef[0] < 1)  # one confident mistake: soften (T > 1)
    True
    """
    if parametrisation not in _PARAMETRISATIONS:
        raise ConfigError(
            f"parametrisation: expected one of {', '.join(_PARAMETRISATIONS)}, "
            f"got {parametrisation!r}"
        )
    n, k = logits.shape
    onehot = np.zeros((n, k))
    onehot[np.arange(n), labels] = 1.0

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        coef, intercept = _unpack(theta, parametrisation, k)
        scaled = apply_logit_scaling(logits, coef, intercept)
        top = scaled.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
        loss = float((lse - scaled[np.arange(n), labels]).mean())
        residual = (softmax(scaled) - onehot) / n  # d loss / d scaled
        if parametrisation == "temperature":
            grad = np.array([-(residual * logits).sum() * coef[0]])
        elif parametrisation == "vector":
            grad = np.concatenate([(residual * logits).sum(axis=0), residual.sum(axis=0)])
        else:
            grad = np.concatenate([(residual.T @ logits).ravel(), residual.sum(axis=0)])
        return loss, grad

    if parametrisation == "temperature":
        start = np.zeros(1)
    elif parametrisation == "vector":
        start = np.concatenate([np.ones(k), np.zeros(k)])
    else:
        start = np.concatenate([np.eye(k).ravel(), np.zeros(k)])
    result = minimize(
        loss_and_grad,
        start,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": tol, "ftol": tol},
    )
    coef, intercept = _unpack(result.x, parametrisation, k)
    return np.array(coef, dtype=np.float64), np.array(intercept, dtype=np.float64)


class _LogitScaling(Calibrator):
    _parametrisation: Parametrisation
    _state_keys = ("coef_", "intercept_")

    def __init__(self, *, kind: Kind = "logits", max_iter: int = 500) -> None:
        self.kind = kind
        self.max_iter = max_iter

    def _logits(self, scores: np.ndarray) -> np.ndarray:
        # Logits as given: vector and matrix scaling are not invariant to the
        # per-row shift that log-softmax would apply.
        return scores if self.kind == "logits" else to_log_probabilities(scores, self.kind)

    def _fit(self, scores: np.ndarray, labels: np.ndarray) -> None:
        logits = self._logits(scores)
        self.coef_, self.intercept_ = fit_logit_scaling(
            logits, labels, self._parametrisation, max_iter=self.max_iter
        )

    def _predict_proba(self, scores: np.ndarray) -> np.ndarray:
        logits = self._logits(scores)
        return softmax(apply_logit_scaling(logits, self.coef_, self.intercept_))


class TemperatureScaling(_LogitScaling):
    """Temperature scaling: ``p = softmax(z / T)`` with one ``T > 0`` fitted on NLL.

    Keeps the predicted class (argmax) of every sample; only the confidence
    changes.

    Parameters
    ----------
    kind : {"logits", "probabilities"}, default "logits"
        What ``scores`` hold. Probabilities are turned into log-probabilities,
        which are logits of the same prediction.
    max_iter : int, default 500
        L-BFGS iterations.

    Attributes
    ----------
    temperature_ : float
    coef_ : array of shape (1,)
        ``1 / T``.
    intercept_ : array of shape (n_classes,)
        Zeros.

    References
    ----------
    Guo, Pleiss, Sun, Weinberger. On calibration of modern neural networks.
    ICML 2017.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.array([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 3.0]])
    >>> cal = TemperatureScaling().fit(z, np.array([0, 1, 1, 1]))
    >>> cal.predict_proba(z).argmax(axis=1)
    array([0, 1, 0, 1])
    """

    method = "temperature"
    _parametrisation = "temperature"

    @property
    def temperature_(self) -> float:
        return float(1.0 / self.coef_[0])


class VectorScaling(_LogitScaling):
    """Vector scaling: ``p = softmax(w * z + b)``, one scale and bias per class, fitted on NLL.

    Parameters
    ----------
    kind : {"logits", "probabilities"}, default "logits"
    max_iter : int, default 500

    Attributes
    ----------
    coef_ : array of shape (n_classes,)
    intercept_ : array of shape (n_classes,)

    References
    ----------
    Guo, Pleiss, Sun, Weinberger. On calibration of modern neural networks.
    ICML 2017.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    >>> VectorScaling().fit(z, np.array([0, 1, 2, 1])).coef_.shape
    (3,)
    """

    method = "vector"
    _parametrisation = "vector"


class MatrixScaling(_LogitScaling):
    """Matrix scaling: ``p = softmax(W z + b)``, fitted on NLL.

    ``n_classes**2 + n_classes`` parameters: it overfits small calibration
    sets; prefer temperature or vector scaling there.

    Parameters
    ----------
    kind : {"logits", "probabilities"}, default "logits"
    max_iter : int, default 500

    Attributes
    ----------
    coef_ : array of shape (n_classes, n_classes)
    intercept_ : array of shape (n_classes,)

    References
    ----------
    Guo, Pleiss, Sun, Weinberger. On calibration of modern neural networks.
    ICML 2017.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.array([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 3.0]])
    >>> MatrixScaling().fit(z, np.array([0, 1, 1, 1])).coef_.shape
    (2, 2)
    """

    method = "matrix"
    _parametrisation = "matrix"
