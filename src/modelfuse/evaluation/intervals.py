"""Bootstrap intervals from resampled statistics, and the p-values that invert them.

Both interval methods take their ends from the order statistics of the ``B``
sorted replicates ``d_(1) <= ... <= d_(B)``: at level ``1 - alpha`` the
percentile interval is ``[d_(j), d_(B+1-j)]`` with ``j`` the largest integer
such that ``2 j / (B + 1) <= alpha`` (Davison and Hinkley's ``(B + 1)``
convention); BCa moves the two tail levels ``alpha / 2`` and ``1 - alpha / 2``
to ``beta_lo``, ``beta_hi`` and takes ``d_(floor((B+1) beta_lo))`` and
``d_(ceil((B+1) beta_hi))``.

The p-value of "no difference" is the inversion of the same interval: the
smallest ``alpha`` at which the ``1 - alpha`` interval excludes 0 (``alpha = 1 - level`` in floating
point, exactly as a caller computes it: ``1 - 0.8`` is just below 0.2). For
the percentile interval that is ``2 (min(L, R) + 1) / (B + 1)``, with ``L`` the
replicates at or below 0 and ``R`` those at or above; for BCa it solves the
level correction for the tail that reaches 0. So ``p <= 1 - level`` exactly
when the interval at ``level`` excludes 0, and the smallest p the replicates
can give, ``p_floor = 2 / (B + 1)``, is stated with every result.

BCa is used only where it is stable: at least :data:`BCA_MIN_RESAMPLES`
replicates, a jackknife that varies, a finite bias correction and
acceleration, a level correction that is monotone over every level the
replicates can resolve, both adjusted ends inside the replicates, and the
estimate strictly inside the interval. Otherwise the percentile interval is
used and the result says why (``fallback``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import ndtr, ndtri

from modelfuse.errors import ConfigError

if TYPE_CHECKING:
    from modelfuse.evaluation.results import IntervalResult

__all__ = [
    "BCA_MIN_RESAMPLES",
    "INTERVAL_METHODS",
    "bca_interval",
    "interval_at_level",
    "min_resamples",
    "percentile_interval",
]

INTERVAL_METHODS: dict[str, str] = {
    "bca": "bootstrap BCa",
    "percentile": "bootstrap percentile",
}
"""The bootstrap interval methods by name, with the label they print as."""

BCA_MIN_RESAMPLES = 1000
"""Fewer replicates than this give the percentile interval instead of BCa (Efron 1987)."""


def _check_level(confidence_level: float) -> None:
    if not 0 < confidence_level < 1:
        raise ConfigError(
            f"confidence_level: expected a number in (0, 1) such as 0.95, got {confidence_level!r}"
        )


def _alpha(confidence_level: float) -> float:
    """``1 - confidence_level``, computed as the caller compares a p-value with it."""
    return 1.0 - confidence_level


def _tail_count(alpha: float, n: int) -> int:
    """The largest ``j >= 0`` with ``2 j / (n + 1) <= alpha`` (in the float arithmetic of p-values)."""
    j = max(0, int(math.floor((n + 1) * alpha / 2)))
    while 2 * (j + 1) / (n + 1) <= alpha:
        j += 1
    while j > 0 and 2 * j / (n + 1) > alpha:
        j -= 1
    return j


def min_resamples(confidence_level: float) -> int:
    """The fewest replicates whose percentile interval at ``confidence_level`` has finite ends.

    Examples
    --------
    >>> min_resamples(0.95), min_resamples(0.99)
    (39, 199)
    """
    _check_level(confidence_level)
    alpha = _alpha(confidence_level)
    n = max(1, int(math.ceil(2 / alpha)) - 1)
    while _tail_count(alpha, n) < 1:
        n += 1
    while n > 1 and _tail_count(alpha, n - 1) >= 1:
        n -= 1
    return n


def _check_enough(n: int, confidence_level: float) -> None:
    needed = min_resamples(confidence_level)
    if n < needed:
        raise ConfigError(
            f"n_resamples: {n} resamples cannot give a {confidence_level:.4g} interval "
            f"(its tails hold {(1 - confidence_level) / 2:.3g} of the replicates each); "
            f"pass n_resamples >= {needed}"
        )


def _order_interval(
    ordered: np.ndarray, beta_lo: float, beta_hi: float
) -> tuple[float, float]:
    """``d_(floor((B+1) beta_lo))`` and ``d_(ceil((B+1) beta_hi))``; an end beyond the replicates is infinite."""
    n = len(ordered)
    j_lo = int(math.floor((n + 1) * beta_lo + 1e-9))
    j_hi = int(math.ceil((n + 1) * beta_hi - 1e-9))
    low = float(ordered[j_lo - 1]) if j_lo >= 1 else -math.inf
    high = float(ordered[j_hi - 1]) if j_hi <= n else math.inf
    return low, high


def _percentile_from_sorted(ordered: np.ndarray, confidence_level: float) -> tuple[float, float]:
    n = len(ordered)
    j = _tail_count(_alpha(confidence_level), n)
    if j < 1:
        return -math.inf, math.inf
    return float(ordered[j - 1]), float(ordered[n - j])


def _bca_levels(z0: float, acceleration: float, confidence_level: float) -> tuple[float, float]:
    alpha = _alpha(confidence_level)
    z = ndtri(np.array([alpha / 2, 1 - alpha / 2]))
    t = z0 + z
    levels = ndtr(z0 + t / (1 - acceleration * t))
    return float(levels[0]), float(levels[1])


def _bca_parameters(
    estimate: float,
    ordered: np.ndarray,
    jackknife_values: np.ndarray,
    jackknife_weights: np.ndarray | None,
) -> tuple[float, float, bool]:
    """Bias correction ``z0``, acceleration ``a``, and whether the jackknife varies at all."""
    jack = np.asarray(jackknife_values, dtype=float)
    weights = np.ones_like(jack) if jackknife_weights is None else np.asarray(jackknife_weights)
    n = len(ordered)
    below = int(np.searchsorted(ordered, estimate, side="left"))
    equal = int(np.searchsorted(ordered, estimate, side="right")) - below
    z0 = float(ndtri((below + 0.5 * equal) / n))
    varies = bool(jack.size > 1 and np.any(jack != jack[0]))
    deviations = np.average(jack, weights=weights) - jack
    spread = float(np.sum(weights * deviations**2))
    acceleration = 0.0 if spread <= 0 else float(
        np.sum(weights * deviations**3) / (6 * spread**1.5)
    )
    return z0, acceleration, varies


def percentile_interval(
    distribution: np.ndarray, confidence_level: float = 0.95
) -> tuple[float, float]:
    """The percentile bootstrap interval: the order statistics ``d_(j)`` and ``d_(B+1-j)``.

    ``j`` is the largest integer with ``2 j / (B + 1) <= 1 - confidence_level``,
    so the interval excludes 0 exactly when the bootstrap p-value
    ``2 (min(#d <= 0, #d >= 0) + 1) / (B + 1)`` is at most ``1 - confidence_level``.

    Parameters
    ----------
    distribution : array of shape (n_resamples,)
        Bootstrap replicates of the statistic.
    confidence_level : float

    Returns
    -------
    (low, high) : tuple of float

    Raises
    ------
    ConfigError
        When there are too few replicates for the level (:func:`min_resamples`).

    References
    ----------
    Davison and Hinkley, *Bootstrap Methods and their Application*, 1997, sec. 5.2.

    Examples
    --------
    >>> percentile_interval(np.arange(1.0, 200.0), 0.95)
    (5.0, 195.0)
    """
    _check_level(confidence_level)
    ordered = np.sort(np.asarray(distribution, dtype=float).ravel())
    _check_enough(len(ordered), confidence_level)
    return _percentile_from_sorted(ordered, confidence_level)


def bca_interval(
    estimate: float,
    distribution: np.ndarray,
    jackknife_values: np.ndarray,
    *,
    confidence_level: float = 0.95,
    jackknife_weights: np.ndarray | None = None,
) -> tuple[float, float]:
    """The bias-corrected and accelerated (BCa) bootstrap interval, without stability checks.

    ``z0 = Phi^-1(share of replicates below the estimate)`` (replicates equal
    to it count one half), the acceleration
    ``a = sum(w d^3) / (6 (sum(w d^2))^1.5)`` with ``d = mean(jackknife) -
    jackknife``, and the ends are the order statistics at
    ``beta = Phi(z0 + (z0 + z) / (1 - a (z0 + z)))`` for ``z`` the normal
    quantiles of the percentile interval (``floor((B+1) beta_lo)`` and
    ``ceil((B+1) beta_hi)``). With ``z0 = 0`` and ``a = 0`` it is the
    percentile interval. An end beyond the replicates is the extreme replicate.
    :func:`~modelfuse.evaluation.bootstrap_metric` checks stability and falls
    back to the percentile interval where BCa is unreliable.

    Parameters
    ----------
    estimate : float
        The statistic on the full sample.
    distribution : array of shape (n_resamples,)
        Bootstrap replicates.
    jackknife_values : array of shape (m,)
        Leave-one-out (or leave-one-group-out) values of the statistic.
    confidence_level : float
    jackknife_weights : array of shape (m,), optional
        How many samples each jackknife value stands for (equal samples share one value).

    Returns
    -------
    (low, high) : tuple of float

    References
    ----------
    Efron, "Better bootstrap confidence intervals", JASA 82 (1987) 171-185.

    Examples
    --------
    >>> d = np.array([-2.0, -1.0, 1.0, 2.0]); jack = np.array([-1.0, 1.0])
    >>> bca_interval(0.0, d, jack, confidence_level=0.5) == percentile_interval(d, 0.5)
    True
    """
    _check_level(confidence_level)
    ordered = np.sort(np.asarray(distribution, dtype=float).ravel())
    z0, acceleration, _ = _bca_parameters(estimate, ordered, jackknife_values, jackknife_weights)
    if not np.isfinite(z0):
        return float(ordered[0]), float(ordered[-1])
    low, high = _order_interval(ordered, *_bca_levels(z0, acceleration, confidence_level))
    low = float(ordered[0]) if not np.isfinite(low) else low
    high = float(ordered[-1]) if not np.isfinite(high) else high
    return low, high


@dataclass(frozen=True)
class Inference:
    """How an interval is read off sorted replicates: the method used and its parameters.

    ``kind`` is ``"bca"`` or ``"percentile"`` (the method actually used);
    ``fallback`` says why BCa was not used when it was asked for.
    """

    ordered: np.ndarray
    kind: str
    bias_correction: float = 0.0
    acceleration: float = 0.0
    fallback: str | None = None

    @property
    def p_floor(self) -> float:
        """The smallest two-sided p-value ``B`` replicates can give: ``2 / (B + 1)``."""
        return min(1.0, 2 / (len(self.ordered) + 1))

    def interval(self, confidence_level: float) -> tuple[float, float]:
        """The interval at ``confidence_level``; an end the replicates cannot resolve is infinite."""
        _check_level(confidence_level)
        if self.kind == "percentile":
            return _percentile_from_sorted(self.ordered, confidence_level)
        levels = _bca_levels(self.bias_correction, self.acceleration, confidence_level)
        return _order_interval(self.ordered, *levels)

    def pvalue(self) -> float:
        """The smallest ``alpha`` at which the ``1 - alpha`` interval excludes 0 (two-sided)."""
        ordered = self.ordered
        n = len(ordered)
        at_or_below = int(np.searchsorted(ordered, 0.0, side="right"))
        below = int(np.searchsorted(ordered, 0.0, side="left"))
        at_or_above = n - below
        if self.kind == "percentile":
            return float(min(1.0, 2 * (min(at_or_below, at_or_above) + 1) / (n + 1)))
        z0, a = self.bias_correction, self.acceleration
        candidates = [1.0]
        if at_or_below < n:  # the lower end rises above 0 once beta_lo >= (L + 1) / (B + 1)
            c = float(ndtri((at_or_below + 1) / (n + 1))) - z0
            if 1 + a * c > 0:
                candidates.append(2 * float(ndtr(c / (1 + a * c) - z0)))
            elif a > 0:
                candidates.append(0.0)
        if below > 0:  # the upper end falls below 0 once beta_hi <= N / (B + 1)
            c = float(ndtri(below / (n + 1))) - z0
            if 1 + a * c > 0:
                candidates.append(2 * float(ndtr(z0 - c / (1 + a * c))))
            elif a < 0:
                candidates.append(0.0)
        return float(min(1.0, max(self.p_floor, min(candidates))))


def infer(
    estimate: float,
    distribution: np.ndarray,
    *,
    method: str,
    confidence_level: float,
    jackknife: tuple[np.ndarray, np.ndarray] | None = None,
) -> Inference:
    """Choose BCa where stable (else the percentile interval) for these replicates."""
    ordered = np.sort(np.asarray(distribution, dtype=float).ravel())
    _check_enough(len(ordered), confidence_level)
    if method == "percentile" or jackknife is None:
        return Inference(ordered, "percentile")
    reason = None
    z0, acceleration, varies = _bca_parameters(estimate, ordered, *jackknife)
    n = len(ordered)
    edge = float(ndtri(1 - 1 / (n + 1)))
    if n < BCA_MIN_RESAMPLES:
        reason = f"{n} resamples (BCa needs at least {BCA_MIN_RESAMPLES})"
    elif not varies:
        reason = "every jackknife value is equal, so the acceleration cannot be estimated"
    elif not np.isfinite(z0):
        reason = "every resample lies on one side of the estimate (infinite bias correction)"
    elif not np.isfinite(acceleration):
        reason = "the acceleration is not finite"
    elif abs(acceleration) * (abs(z0) + edge) >= 1:
        reason = f"the acceleration {acceleration:.3g} makes the level correction non-monotone"
    else:
        candidate = Inference(ordered, "bca", z0, acceleration)
        low, high = candidate.interval(confidence_level)
        if not (np.isfinite(low) and np.isfinite(high)):
            reason = "the corrected tail levels lie beyond the resamples"
        elif not low < estimate < high:
            reason = (
                f"the estimate {estimate:.4g} lies outside or at the edge of the BCa interval "
                f"[{low:.4g}, {high:.4g}]"
            )
        else:
            return candidate
    return Inference(ordered, "percentile", fallback=f"percentile, as BCa is unstable here: {reason}")


def interval_at_level(result: IntervalResult, confidence_level: float) -> IntervalResult:
    """The same bootstrap result with its interval read at another level.

    The same replicates and the same method (BCa with the same bias
    correction and acceleration, or percentile) are used, so the interval at
    level ``1 - alpha`` excludes 0 exactly when the result's p-value is at
    most ``alpha``. An end the replicates cannot resolve at that level is
    infinite.

    Parameters
    ----------
    result : IntervalResult
        From :func:`~modelfuse.evaluation.bootstrap_metric` or
        :func:`~modelfuse.evaluation.paired_bootstrap`.
    confidence_level : float

    Returns
    -------
    IntervalResult

    Examples
    --------
    >>> from modelfuse.evaluation import paired_bootstrap
    >>> rng = np.random.default_rng(0); y = rng.integers(0, 2, 300)
    >>> a = np.eye(2)[np.where(rng.random(300) < 0.8, y, 1 - y)]
    >>> b = np.eye(2)[np.where(rng.random(300) < 0.7, y, 1 - y)]
    >>> r = paired_bootstrap(a, b, y, method="percentile", random_state=0)
    >>> def excludes_zero(level):
    ...     low, high = interval_at_level(r, level).ci
    ...     return bool(low > 0 or high < 0)
    >>> all(excludes_zero(lv) == (r.pvalue <= 1 - lv) for lv in (0.5, 0.8, 0.9, 0.95, 0.99))
    True
    """
    inference = Inference(
        np.sort(np.asarray(result.bootstrap_distribution, dtype=float)),
        "bca" if result.method_used == "bca" else "percentile",
        result.bias_correction,
        result.acceleration,
    )
    return replace(
        result,
        ci=inference.interval(confidence_level),
        confidence_level=confidence_level,
        bootstrap_distribution=np.array(result.bootstrap_distribution),
    )
