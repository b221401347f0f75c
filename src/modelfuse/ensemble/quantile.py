"""Quantile ensembles for regression: weighted quantiles, monotonicity, conformal intervals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.isotonic import isotonic_regression
from sklearn.utils.validation import check_is_fitted

from modelfuse.ensemble.voting import check_weights
from modelfuse.errors import ConfigError, DataError

__all__ = [
    "QuantileEnsemble",
    "check_quantile_predictions",
    "combine_quantiles",
    "conformal_margin",
]

Monotone = Literal["sort", "isotonic"]


def check_quantile_predictions(
    predictions: np.ndarray | Sequence[np.ndarray], levels: Sequence[float], *, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Check (n_models, n_samples, n_levels) predictions and increasing levels in (0, 1)."""
    q = np.asarray(levels, dtype=np.float64)
    if q.ndim != 1 or q.size == 0 or not ((q > 0) & (q < 1)).all() or (np.diff(q) <= 0).any():
        raise ConfigError(f"levels: expected strictly increasing numbers in (0, 1), got {levels!r}")
    p = np.asarray(predictions, dtype=np.float64)
    if p.size == 0:
        raise DataError(f"{source}: the array is empty; expected quantile predictions")
    if p.ndim != 3 or p.shape[2] != q.size:
        raise DataError(
            f"{source}: expected shape (n_models, n_samples, {q.size}) for {q.size} levels, "
            f"got {p.shape}"
        )
    if not np.isfinite(p).all():
        raise DataError(f"{source}: contains NaN or inf; remove or repair them")
    return p, q


def combine_quantiles(
    predictions: np.ndarray | Sequence[np.ndarray],
    levels: Sequence[float],
    *,
    weights: np.ndarray | Sequence[float] | None = None,
    monotone: Monotone = "sort",
) -> np.ndarray:
    """Weighted average of the members' quantile predictions, made non-decreasing in the level.

    Averaging quantiles level by level (quantile averaging, "Vincentisation")
    can cross when the members' own quantiles cross. Monotonicity is
    restored per sample by sorting (the rearrangement of Chernozhukov et
    al.) or by isotonic regression over the levels (the L2-closest
    non-decreasing curve); only rows that cross are touched.

    Parameters
    ----------
    predictions : array of shape (n_models, n_samples, n_levels)
    levels : sequence of n_levels increasing numbers in (0, 1)
    weights : array of shape (n_models,), optional
        Non-negative, normalised to sum to one; uniform when omitted.
    monotone : {"sort", "isotonic"}, default "sort"

    Returns
    -------
    array of shape (n_samples, n_levels)

    References
    ----------
    Chernozhukov, Fernandez-Val, Galichon. Quantile and probability curves
    without crossing. Econometrica, 2010.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[[1.0, 3.0]]]); b = np.array([[[2.0, 0.0]]])
    >>> combine_quantiles(np.concatenate([a, b]), [0.1, 0.9])
    array([[1.5, 1.5]])
    >>> combine_quantiles(np.concatenate([a, b]), [0.1, 0.9], weights=[1, 3])
    array([[0.75, 1.75]])
    """
    if monotone not in ("sort", "isotonic"):
        raise ConfigError(f"monotone: expected 'sort' or 'isotonic', got {monotone!r}")
    p, _ = check_quantile_predictions(predictions, levels, source="predictions")
    w = check_weights(weights, p.shape[0])
    combined = np.tensordot(w, p, axes=(0, 0))
    crossing = np.flatnonzero((np.diff(combined, axis=1) < 0).any(axis=1))
    if crossing.size:
        if monotone == "sort":
            combined[crossing] = np.sort(combined[crossing], axis=1)
        else:
            for i in crossing:
                combined[i] = isotonic_regression(combined[i], increasing=True)
    return combined


def conformal_margin(
    lower: np.ndarray, upper: np.ndarray, targets: np.ndarray, *, alpha: float
) -> float:
    """Split-conformal correction of an interval (conformalized quantile regression).

    Scores ``E_i = max(lower_i - y_i, y_i - upper_i)`` on a calibration set
    of ``n`` samples; the margin is the ``ceil((n + 1)(1 - alpha))``-th
    smallest score (infinite when that exceeds ``n``). The interval
    ``[lower - margin, upper + margin]`` then covers a new exchangeable
    sample with probability at least ``1 - alpha``. The margin is negative
    when the interval was too wide.

    References
    ----------
    Romano, Patterson, Candes. Conformalized quantile regression. NeurIPS 2019.

    Examples
    --------
    >>> import numpy as np
    >>> conformal_margin(np.zeros(4), np.ones(4), np.array([0.5, 2.0, -1.0, 0.5]), alpha=0.5)
    1.0
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha: expected a number in (0, 1), got {alpha!r}")
    y = np.asarray(targets, dtype=np.float64)
    lo, hi = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    if y.ndim != 1 or lo.shape != y.shape or hi.shape != y.shape:
        raise DataError(
            f"targets: expected one target per sample, got {y.shape} for bounds {lo.shape}"
        )
    if not np.isfinite(y).all():
        raise DataError("targets: contain NaN or inf; remove or repair them")
    scores = np.maximum(lo - y, y - hi)
    rank = int(np.ceil((y.size + 1) * (1 - alpha)))
    if rank > y.size:
        return float("inf")
    return float(np.partition(scores, rank - 1)[rank - 1])


class QuantileEnsemble(BaseEstimator):
    """A quantile ensemble with a split-conformal prediction interval.

    ``fit`` takes the members' quantile predictions on a calibration set and
    the true targets, and learns the conformal margin of the interval
    between the ``interval`` levels; ``predict`` returns the combined
    quantiles and ``predict_interval`` the corrected interval.

    Parameters
    ----------
    levels : sequence of float
        The quantile levels the members predict, increasing in (0, 1).
    weights : array of shape (n_models,), optional
    monotone : {"sort", "isotonic"}, default "sort"
    alpha : float, default 0.1
        Target miscoverage of the interval.
    interval : (float, float), optional
        The two levels bounding the interval; default the outermost levels.

    Attributes
    ----------
    margin_ : float

    References
    ----------
    Romano, Patterson, Candes. Conformalized quantile regression. NeurIPS 2019.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.normal(size=200)
    >>> members = np.stack([np.tile([-1.0, 0.0, 1.0], (200, 1))] * 2)
    >>> ens = QuantileEnsemble([0.05, 0.5, 0.95], alpha=0.1).fit(members, y)
    >>> bool(ens.margin_ > 0)  # [-1, 1] covers ~68% of N(0, 1): widen it
    True
    """

    def __init__(
        self,
        levels: Sequence[float],
        *,
        weights: np.ndarray | Sequence[float] | None = None,
        monotone: Monotone = "sort",
        alpha: float = 0.1,
        interval: tuple[float, float] | None = None,
    ) -> None:
        self.levels = levels
        self.weights = weights
        self.monotone = monotone
        self.alpha = alpha
        self.interval = interval

    def _bounds(self) -> tuple[int, int]:
        levels = list(np.asarray(self.levels, dtype=np.float64))
        if self.interval is None:
            return 0, len(levels) - 1
        lo, hi = self.interval
        missing = [v for v in (lo, hi) if v not in levels]
        if missing or lo >= hi:
            raise ConfigError(
                f"interval: expected two increasing levels among {levels}, got {self.interval!r}"
            )
        return levels.index(lo), levels.index(hi)

    def predict(self, predictions: np.ndarray) -> np.ndarray:
        """Combined, non-decreasing quantiles, shape (n_samples, n_levels)."""
        return combine_quantiles(
            predictions, self.levels, weights=self.weights, monotone=self.monotone
        )

    def fit(self, predictions: np.ndarray, targets: np.ndarray) -> QuantileEnsemble:
        """Learn the conformal margin on a calibration set."""
        lo, hi = self._bounds()
        combined = self.predict(predictions)
        y = np.asarray(targets, dtype=np.float64)
        if y.shape != (combined.shape[0],):
            raise DataError(
                f"targets: {y.shape} for {combined.shape[0]} samples; expected one per sample"
            )
        self.margin_ = conformal_margin(combined[:, lo], combined[:, hi], y, alpha=self.alpha)
        return self

    def predict_interval(self, predictions: np.ndarray) -> np.ndarray:
        """``[lower - margin, upper + margin]``, shape (n_samples, 2)."""
        check_is_fitted(self)
        lo, hi = self._bounds()
        combined = self.predict(predictions)
        return np.stack([combined[:, lo] - self.margin_, combined[:, hi] + self.margin_], axis=1)
