"""Binary calibrators and their one-vs-rest extension: Platt, isotonic, histogram binning.

Each calibrator maps one probability ``p_c`` to a calibrated ``q_c``. With
two classes one map is fitted on ``p_1`` and the output is ``(1 - q, q)``.
With more, one map per class is fitted on ``(p_c, label == c)`` and the
outputs are renormalised to sum to one; a row whose ``q_c`` are all zero
keeps its input probabilities.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize
from sklearn.isotonic import IsotonicRegression

from modelfuse.calibration.base import Calibrator, Kind, check_bool_param, check_kind_param
from modelfuse.calibration.metrics import MAX_BINS, bin_index
from modelfuse.calibration.saved import (
    saved_array,
    saved_choice,
    saved_field,
    saved_integer,
    saved_number,
)
from modelfuse.calibration.softmax import sigmoid, to_probabilities
from modelfuse.errors import ConfigError

__all__ = [
    "HistogramBinning",
    "IsotonicCalibration",
    "PlattScaling",
    "fit_platt",
]


class _OneVsRest(Calibrator):
    """Fits one binary map per column (one in total for two classes)."""

    def _columns(self, probs: np.ndarray) -> np.ndarray:
        return probs[:, 1:] if probs.shape[1] == 2 else probs

    def _fit(self, scores: np.ndarray, labels: np.ndarray) -> None:
        probs = to_probabilities(scores, self.kind)
        columns = self._columns(probs)
        targets = (labels[:, None] == np.arange(probs.shape[1])[None, :]).astype(np.float64)
        targets = self._columns(targets)
        maps = [self._fit_column(columns[:, j], targets[:, j]) for j in range(columns.shape[1])]
        self._store(maps)

    def _predict_proba(self, scores: np.ndarray) -> np.ndarray:
        probs = to_probabilities(scores, self.kind)
        columns = self._columns(probs)
        q = np.stack([self._apply_column(j, columns[:, j]) for j in range(columns.shape[1])], 1)
        q = np.clip(q, 0.0, 1.0)
        if probs.shape[1] == 2:
            return np.concatenate([1.0 - q, q], axis=1)
        total = q.sum(axis=1, keepdims=True)
        empty = total[:, 0] <= 0
        out = q / np.where(total > 0, total, 1.0)
        out[empty] = probs[empty]
        return out


def _saved_maps(
    state: Mapping[str, Any], name: str, n_maps: int, length: int | None, *, low: float = 0.0
) -> list[np.ndarray]:
    """``state[name]``: a list of ``n_maps`` 1-D arrays (of ``length`` when given) in [low, 1]."""
    key = f"state.{name}"
    value = saved_field(state, name, key)
    if not isinstance(value, list) or len(value) != n_maps:
        got = f"{len(value)} items" if isinstance(value, list) else type(value).__name__
        raise ConfigError(f'"{key}": expected a list of {n_maps} arrays (one per map), got {got}')
    return [
        saved_array(v, f"{key}[{j}]", shape=(length,), low=low, high=1.0)
        for j, v in enumerate(value)
    ]


def _check_non_decreasing(arrays: list[np.ndarray], key: str) -> None:
    for j, a in enumerate(arrays):
        if np.any(np.diff(a) < 0):
            raise ConfigError(f'"state.{key}[{j}]": expected non-decreasing values')


def _logit(p: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    p = np.clip(p, eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def fit_platt(
    scores: np.ndarray, targets: np.ndarray, *, smoothing: bool = True
) -> tuple[float, float]:
    """Fit ``sigmoid(a * s + b)`` to binary targets by minimising the log loss (L-BFGS).

    Parameters
    ----------
    scores : array of shape (n_samples,)
    targets : array of shape (n_samples,) of 0/1
    smoothing : bool, default True
        Platt's targets ``(N+ + 1) / (N+ + 2)`` for positives and
        ``1 / (N- + 2)`` for negatives instead of 1 and 0 (as in Platt's
        paper and scikit-learn's ``CalibratedClassifierCV``), which keeps
        ``a`` finite on separable data.

    Returns
    -------
    a, b : float

    References
    ----------
    Platt. Probabilistic outputs for support vector machines and comparisons
    to regularized likelihood methods. 1999.

    Examples
    --------
    >>> import numpy as np
    >>> a, b = fit_platt(np.array([-2.0, -1.0, 1.0, 2.0]), np.array([0, 1, 0, 1]))
    >>> bool(abs(a) < 1)
    True
    """
    y = np.asarray(targets, dtype=np.float64)
    if smoothing:
        n_pos = y.sum()
        n_neg = y.size - n_pos
        y = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1.0 / (n_neg + 2))
    s = np.asarray(scores, dtype=np.float64)
    n = s.size

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        f = theta[0] * s + theta[1]
        loss = float((np.logaddexp(0.0, f) - y * f).sum() / n)
        r = (sigmoid(f) - y) / n
        return loss, np.array([(r * s).sum(), r.sum()])

    result = minimize(loss_and_grad, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(result.x[0]), float(result.x[1])


class PlattScaling(_OneVsRest):
    """Platt scaling: a logistic regression on the log-odds of each class probability.

    For class ``c`` the score is ``s = log(p_c / (1 - p_c))`` (for binary
    logits this is the logit difference ``z_1 - z_0``) and the map is
    ``sigmoid(a_c * s + b_c)``; one-vs-rest with renormalisation for more
    than two classes.

    Parameters
    ----------
    kind : {"probabilities", "logits"}, default "probabilities"
        What ``scores`` hold; logits are softmaxed first.
    smoothing : bool, default True
        Platt's smoothed targets; see :func:`fit_platt`.

    Attributes
    ----------
    coef_, intercept_ : arrays of shape (n_maps,)
        ``a`` and ``b`` per map (one map for two classes, else one per class).

    References
    ----------
    Platt. Probabilistic outputs for support vector machines and comparisons
    to regularized likelihood methods. 1999.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    >>> PlattScaling().fit(p, np.array([0, 1, 1, 0])).predict_proba(p).shape
    (4, 2)
    """

    method = "platt"
    _state_keys = ("coef_", "intercept_")
    _param_checks = {"kind": check_kind_param, "smoothing": check_bool_param}

    def __init__(self, *, kind: Kind = "probabilities", smoothing: bool = True) -> None:
        self.kind = kind
        self.smoothing = smoothing

    def _fit_column(self, p: np.ndarray, hit: np.ndarray) -> tuple[float, float]:
        return fit_platt(_logit(p), hit, smoothing=self.smoothing)

    def _store(self, maps: list[tuple[float, float]]) -> None:
        self.coef_ = np.array([a for a, _ in maps])
        self.intercept_ = np.array([b for _, b in maps])

    def _apply_column(self, j: int, p: np.ndarray) -> np.ndarray:
        return sigmoid(self.coef_[j] * _logit(p) + self.intercept_[j])

    def _load_state(self, state: Mapping[str, Any]) -> None:
        for name in ("coef_", "intercept_"):
            key = f"state.{name}"
            value = saved_array(saved_field(state, name, key), key, shape=(self._n_maps(),))
            setattr(self, name, value)


class IsotonicCalibration(_OneVsRest):
    """Isotonic regression of the label on each class probability (monotone, piecewise linear).

    Fitted with scikit-learn's ``IsotonicRegression(y_min=0, y_max=1,
    out_of_bounds="clip")``; the fitted thresholds are kept and applied by
    linear interpolation (what its ``predict`` does), so the saved form is
    plain numbers.

    Parameters
    ----------
    kind : {"probabilities", "logits"}, default "probabilities"

    Attributes
    ----------
    x_thresholds_, y_thresholds_ : list of arrays
        One pair per map.

    References
    ----------
    Zadrozny, Elkan. Transforming classifier scores into accurate multiclass
    probability estimates. KDD 2002.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    >>> IsotonicCalibration().fit(p, np.array([0, 1, 0, 1])).predict_proba(p)[:, 1]
    array([0., 1., 0., 1.])
    """

    method = "isotonic"
    _state_keys = ("x_thresholds_", "y_thresholds_")
    _param_checks = {"kind": check_kind_param}

    def __init__(self, *, kind: Kind = "probabilities") -> None:
        self.kind = kind

    def _fit_column(self, p: np.ndarray, hit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, hit)
        return np.asarray(iso.X_thresholds_, float), np.asarray(iso.y_thresholds_, float)

    def _store(self, maps: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.x_thresholds_ = [x for x, _ in maps]
        self.y_thresholds_ = [y for _, y in maps]

    def _apply_column(self, j: int, p: np.ndarray) -> np.ndarray:
        return np.interp(p, self.x_thresholds_[j], self.y_thresholds_[j])

    def _load_state(self, state: Mapping[str, Any]) -> None:
        x = _saved_maps(state, "x_thresholds_", self._n_maps(), None)
        _check_non_decreasing(x, "x_thresholds_")
        y = _saved_maps(state, "y_thresholds_", self._n_maps(), None)
        for j, (xj, yj) in enumerate(zip(x, y, strict=True)):
            if xj.shape != yj.shape:
                raise ConfigError(
                    f'"state.y_thresholds_[{j}]": expected {xj.size} values, as many as '
                    f'"state.x_thresholds_[{j}]", got {yj.size}'
                )
        self.x_thresholds_, self.y_thresholds_ = x, y


def _check_n_bins(value: Any, key: str) -> int:
    return saved_integer(value, key, low=1, high=MAX_BINS)


def _check_binning(value: Any, key: str) -> str:
    return saved_choice(value, key, ("uniform", "quantile"))


def _check_prior_strength(value: Any, key: str) -> float:
    return saved_number(value, key, low=0.0, open_low=True)


class HistogramBinning(_OneVsRest):
    """Histogram binning: each bin of a class probability maps to its smoothed label frequency.

    A bin holding ``n_b`` calibration samples of which ``h_b`` are hits maps
    to ``(h_b + s m_b) / (n_b + s)``: the posterior mean of the hit rate
    under a Beta prior of mean ``m_b`` (the bin's midpoint, what the
    uncalibrated model says there, kept within ``[1 / (2 n_bins),
    1 - 1 / (2 n_bins)]``) and strength ``s = prior_strength``
    pseudo-samples. A bin never maps to 0 or 1, so no class ever gets a
    probability of exactly 0 (a hit there would cost an infinite log-loss),
    and a sparsely filled bin stays near the identity; an empty bin maps to
    ``m_b``. With ``n_b`` large the value tends to the plain frequency
    ``h_b / n_b`` of Zadrozny and Elkan (2001).

    Parameters
    ----------
    kind : {"probabilities", "logits"}, default "probabilities"
    n_bins : int, default 15
        At most ``MAX_BINS`` (10000).
    binning : {"uniform", "quantile"}, default "uniform"
        Equal-width bins ``(lower, upper]`` over [0, 1] (Guo et al. 2017), or
        equal-mass bins whose inner edges are quantiles of the calibration
        probabilities (Zadrozny and Elkan 2001).
    prior_strength : float, default 2.0
        ``s`` above, in pseudo-samples (> 0); 2 with ``m_b = 1/2`` would be
        Laplace's rule of succession.

    Attributes
    ----------
    edges_ : list of arrays of shape (n_bins + 1,)
    values_ : list of arrays of shape (n_bins,)

    References
    ----------
    Zadrozny, Elkan. Obtaining calibrated probability estimates from
    decision trees and naive Bayesian classifiers. ICML 2001.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    >>> cal = HistogramBinning(n_bins=2).fit(p, np.array([0, 1, 1, 1]))
    >>> cal.values_[0]  # (1 + 2 * 0.25) / (2 + 2) and (2 + 2 * 0.75) / (2 + 2)
    array([0.375, 0.875])
    """

    method = "histogram"
    _state_keys = ("edges_", "values_")
    _param_checks = {
        "kind": check_kind_param,
        "n_bins": _check_n_bins,
        "binning": _check_binning,
        "prior_strength": _check_prior_strength,
    }

    def __init__(
        self,
        *,
        kind: Kind = "probabilities",
        n_bins: int = 15,
        binning: Literal["uniform", "quantile"] = "uniform",
        prior_strength: float = 2.0,
    ) -> None:
        self.kind = kind
        self.n_bins = n_bins
        self.binning = binning
        self.prior_strength = prior_strength

    def _fit_column(self, p: np.ndarray, hit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.binning == "uniform":
            edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        else:
            edges = np.quantile(p, np.linspace(0.0, 1.0, self.n_bins + 1))
            edges[0], edges[-1] = 0.0, 1.0
        ids = bin_index(edges, p)
        count = np.bincount(ids, minlength=self.n_bins)
        hits = np.bincount(ids, weights=hit, minlength=self.n_bins)
        floor = 0.5 / self.n_bins
        prior = np.clip(0.5 * (edges[:-1] + edges[1:]), floor, 1.0 - floor)
        s = float(self.prior_strength)
        return edges, (hits + s * prior) / (count + s)

    def _store(self, maps: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.edges_ = [e for e, _ in maps]
        self.values_ = [v for _, v in maps]

    def _apply_column(self, j: int, p: np.ndarray) -> np.ndarray:
        return self.values_[j][bin_index(self.edges_[j], p)]

    def _load_state(self, state: Mapping[str, Any]) -> None:
        edges = _saved_maps(state, "edges_", self._n_maps(), self.n_bins + 1)
        _check_non_decreasing(edges, "edges_")
        self.edges_ = edges
        self.values_ = _saved_maps(state, "values_", self._n_maps(), self.n_bins)
