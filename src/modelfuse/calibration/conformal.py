"""Split-conformal prediction sets for classification: LAC, APS and RAPS.

A nonconformity score ``s(x, y)`` says how badly label ``y`` fits the
prediction at ``x``. On a calibration set of ``n`` labelled samples the
threshold ``q`` is the ``ceil((n + 1)(1 - alpha))``-th smallest score; the
prediction set of a new sample holds every label whose score is at most
``q``. For exchangeable data the set contains the true label with
probability at least ``1 - alpha``, and at most ``1 - alpha + 1 / (n + 1)``
when the scores have no ties (Vovk et al. 2005; Angelopoulos and Bates 2021).

Scores (``p`` the predicted probabilities, classes ranked by ``p``
descending, ties by class index; ``u`` uniform on [0, 1] when randomized,
else 1):

- ``lac``: ``1 - p_y`` (Sadinle et al. 2019), the smallest average sets.
- ``aps``: the mass of the classes ranked before ``y`` plus ``u p_y``
  (Romano et al. 2020).
- ``raps``: APS plus ``lambda_reg * max(0, rank(y) - k_reg)``, ``rank`` from 1
  (Angelopoulos et al. 2021), which shrinks the sets' tails.

Sets may be empty (every label's score above ``q``): the guarantee holds as
it is, and an empty set is a sign of a confident, wrong-looking sample.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np

from modelfuse.arrays import check_labels, check_predictions
from modelfuse.errors import ConfigError, DataError

__all__ = [
    "CONFORMAL_METHODS",
    "ConformalClassifier",
    "average_set_size",
    "conformal_quantile",
    "conformal_scores",
    "empirical_coverage",
]

ConformalMethod = Literal["lac", "aps", "raps"]
RandomState = int | np.random.Generator | None


def _lac(p: np.ndarray, u: np.ndarray, k_reg: int, lambda_reg: float) -> np.ndarray:
    return 1.0 - p


def _aps(p: np.ndarray, u: np.ndarray, k_reg: int, lambda_reg: float) -> np.ndarray:
    """Scores of every label: the mass ranked before it plus u times its own, plus the penalty."""
    order = np.argsort(-p, axis=1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=1)
    before = np.cumsum(ranked, axis=1) - ranked
    scores_ranked = before + u[:, None] * ranked
    if lambda_reg:
        rank = np.arange(1, p.shape[1] + 1)
        scores_ranked = scores_ranked + lambda_reg * np.maximum(rank - k_reg, 0)[None, :]
    scores = np.empty_like(scores_ranked)
    np.put_along_axis(scores, order, scores_ranked, axis=1)
    return scores


CONFORMAL_METHODS: dict[str, Callable[[np.ndarray, np.ndarray, int, float], np.ndarray]] = {
    "lac": _lac,
    "aps": _aps,
    "raps": _aps,  # the same score with the rank penalty switched on
}


def conformal_scores(
    probs: np.ndarray,
    *,
    method: ConformalMethod = "lac",
    k_reg: int = 1,
    lambda_reg: float = 0.01,
    u: np.ndarray | None = None,
) -> np.ndarray:
    """Nonconformity scores of every label, shape (n_samples, n_classes).

    Parameters
    ----------
    probs : array of shape (n_samples, n_classes)
        Predicted probabilities.
    method : {"lac", "aps", "raps"}, default "lac"
    k_reg, lambda_reg : int, float
        RAPS's penalty ``lambda_reg * max(0, rank - k_reg)``; ignored otherwise.
    u : array of shape (n_samples,), optional
        Uniform draws of the randomized APS/RAPS scores; ``None`` is ``u = 1``
        (each label's own mass counted in full).

    Returns
    -------
    array of shape (n_samples, n_classes)

    Examples
    --------
    >>> import numpy as np
    >>> conformal_scores(np.array([[0.5, 0.3, 0.2]]), method="aps")
    array([[0.5, 0.8, 1. ]])
    """
    if method not in CONFORMAL_METHODS:
        raise ConfigError(
            f"method: unknown {str(method)[:40]!r}; expected one of {', '.join(CONFORMAL_METHODS)}"
        )
    p = _check_probabilities(probs, "probs")
    if u is None:
        draws = np.ones(p.shape[0])
    else:
        draws = np.asarray(u, dtype=np.float64)
        if draws.shape != (p.shape[0],) or not ((draws >= 0) & (draws <= 1)).all():
            raise DataError(
                f"u: expected {p.shape[0]} numbers in [0, 1] (one per sample), "
                f"got shape {draws.shape}"
            )
    return _all_scores(p, draws, method, k_reg, lambda_reg)


def _all_scores(
    p: np.ndarray, u: np.ndarray, method: str, k_reg: int, lambda_reg: float
) -> np.ndarray:
    return CONFORMAL_METHODS[method](p, u, k_reg, lambda_reg if method == "raps" else 0.0)


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest of ``n`` scores; ``inf`` when that exceeds ``n``.

    Parameters
    ----------
    scores : array of shape (n,)
    alpha : float in (0, 1)

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> conformal_quantile(np.array([0.1, 0.4, 0.2, 0.3]), alpha=0.4)
    0.3
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = s.size
    # the rank (n + 1)(1 - alpha) is often an integer in exact arithmetic (n = 19, alpha = 0.1):
    # round before the ceiling so that 18.000000000000004 stays 18
    rank = math.ceil(round((n + 1) * (1 - alpha), 9))
    return float("inf") if rank > n else float(s[max(rank, 1) - 1])


def _check_probabilities(probs: np.ndarray, source: str) -> np.ndarray:
    p = check_predictions(probs, "probabilities", source=source)
    if p.ndim != 2:
        raise DataError(f"{source}: expected shape (n_samples, n_classes), got {p.shape}")
    return p.astype(np.float64)


def _check_sets(sets: np.ndarray) -> np.ndarray:
    s = np.asarray(sets)
    if s.ndim != 2 or s.dtype != bool:
        raise DataError(
            f"sets: expected a bool array of shape (n_samples, n_classes), got {s.dtype} {s.shape}"
        )
    return s


class ConformalClassifier:
    """Split-conformal prediction sets from a classifier's predicted probabilities.

    Parameters
    ----------
    method : {"lac", "aps", "raps"}, default "lac"
        The nonconformity score (see :mod:`modelfuse.calibration.conformal`).
    alpha : float, default 0.1
        Miscoverage: sets hold the true label with probability >= ``1 - alpha``.
    class_conditional : bool, default False
        Mondrian conformal: one threshold per class from the calibration
        samples of that class, so coverage holds within every class
        (Vovk et al. 2005; Sadinle et al. 2019).
    k_reg : int, default 1
        RAPS: ranks up to ``k_reg`` go unpenalised.
    lambda_reg : float, default 0.01
        RAPS: the penalty per rank beyond ``k_reg``.
    randomized : bool, default False
        APS/RAPS: count a uniform share ``u`` of the label's own mass, which
        makes the coverage exact rather than conservative. Not for LAC.
    random_state : int or numpy Generator, optional
        Seeds the draws of ``u``; with an int, ``fit`` and every
        ``predict_sets`` call are repeatable.

    Attributes
    ----------
    quantile_ : float
        The threshold (``class_conditional=False``); ``inf`` when the
        calibration set is too small for ``alpha``.
    class_quantiles_ : array of shape (n_classes,) or None
        The per-class thresholds (``class_conditional=True``).
    n_calibration_ : int
    n_classes_ : int

    Examples
    --------
    >>> import numpy as np
    >>> cal = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    >>> model = ConformalClassifier(alpha=0.4).fit(cal, np.array([0, 0, 1, 1]))
    >>> round(model.quantile_, 4)
    0.3
    >>> model.predict_sets(np.array([[0.75, 0.25], [0.5, 0.5]]))
    array([[ True, False],
           [False, False]])
    """

    def __init__(
        self,
        method: ConformalMethod = "lac",
        alpha: float = 0.1,
        class_conditional: bool = False,
        k_reg: int = 1,
        lambda_reg: float = 0.01,
        randomized: bool = False,
        random_state: RandomState = None,
    ) -> None:
        self.method = method
        self.alpha = alpha
        self.class_conditional = class_conditional
        self.k_reg = k_reg
        self.lambda_reg = lambda_reg
        self.randomized = randomized
        self.random_state = random_state

    def _check_parameters(self) -> None:
        if self.method not in CONFORMAL_METHODS:
            raise ConfigError(
                f"method: unknown {str(self.method)[:40]!r}; "
                f"expected one of {', '.join(CONFORMAL_METHODS)}"
            )
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)):
            raise ConfigError(f"alpha: expected a number in (0, 1) such as 0.1, got {alpha!r:.60}")
        if not 0 < alpha < 1:
            raise ConfigError(f"alpha: expected a number in (0, 1) such as 0.1, got {alpha!r}")
        k = self.k_reg
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ConfigError(f"k_reg: expected an integer >= 0, got {k!r:.60}")
        lam = self.lambda_reg
        if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating)):
            raise ConfigError(f"lambda_reg: expected a finite number >= 0, got {lam!r:.60}")
        if not (np.isfinite(lam) and lam >= 0):
            raise ConfigError(f"lambda_reg: expected a finite number >= 0, got {lam!r}")
        if self.randomized and self.method == "lac":
            raise ConfigError(
                "randomized: LAC has no randomized score; pass randomized=False "
                "or method='aps' / 'raps'"
            )

    def _draws(self, n: int, stream: int) -> np.ndarray:
        if not self.randomized:
            return np.ones(n)
        state = self.random_state
        if isinstance(state, np.random.Generator):
            return state.random(n)
        rng = np.random.default_rng(None if state is None else [int(state), stream])
        return rng.random(n)

    def _scores(self, p: np.ndarray, stream: int) -> np.ndarray:
        draws = self._draws(p.shape[0], stream)
        return _all_scores(p, draws, self.method, int(self.k_reg), float(self.lambda_reg))

    def fit(self, cal_probs: np.ndarray, cal_labels: np.ndarray) -> ConformalClassifier:
        """Compute the threshold(s) from a calibration set.

        Parameters
        ----------
        cal_probs : array of shape (n_calibration, n_classes)
            Predicted probabilities of samples the model was not trained on.
        cal_labels : array of shape (n_calibration,)

        Returns
        -------
        self

        Warns
        -----
        UserWarning
            When ``alpha < 1 / (n + 1)`` (per class with ``class_conditional``):
            no finite threshold reaches ``1 - alpha``, so the sets are full.
        """
        self._check_parameters()
        p = _check_probabilities(cal_probs, "cal_probs")
        n, k = p.shape
        y = check_labels(cal_labels, n_samples=n, n_classes=k, source="cal_labels")
        scores = self._scores(p, 0)[np.arange(n), y]
        self.n_calibration_ = n
        self.n_classes_ = k
        if not self.class_conditional:
            self.quantile_ = conformal_quantile(scores, self.alpha)
            self.class_quantiles_ = None
            if math.isinf(self.quantile_):
                warnings.warn(
                    f"alpha = {self.alpha} is below 1 / (n + 1) = 1/{n + 1} for the {n} "
                    "calibration samples: every prediction set is full; pass a larger alpha "
                    "or calibrate on more samples",
                    UserWarning,
                    stacklevel=2,
                )
            return self
        counts = np.bincount(y, minlength=k)
        self.quantile_ = float("nan")
        self.class_quantiles_ = np.array(
            [conformal_quantile(scores[y == c], self.alpha) for c in range(k)]
        )
        short = np.flatnonzero(np.isinf(self.class_quantiles_))
        if short.size:
            listed = ", ".join(f"class {c} (n = {counts[c]})" for c in short[:5])
            more = f" and {short.size - 5} more" if short.size > 5 else ""
            warnings.warn(
                f"alpha = {self.alpha} is below 1 / (n + 1) for {listed}{more}: sets always "
                "contain those classes; pass a larger alpha or calibrate on more samples",
                UserWarning,
                stacklevel=2,
            )
        return self

    def predict_sets(self, probs: np.ndarray) -> np.ndarray:
        """Prediction sets, a bool array of shape (n_samples, n_classes).

        Parameters
        ----------
        probs : array of shape (n_samples, n_classes)

        Returns
        -------
        array of bool of shape (n_samples, n_classes)
            ``sets[i, c]`` is True when class ``c`` is in sample ``i``'s set.
        """
        if not hasattr(self, "n_classes_"):
            raise ConfigError(
                "ConformalClassifier: not fitted; call fit(cal_probs, cal_labels) first"
            )
        p = _check_probabilities(probs, "probs")
        if p.shape[1] != self.n_classes_:
            raise DataError(
                f"probs: {p.shape[1]} classes, but the classifier was fitted on "
                f"{self.n_classes_}; pass predictions of the same classes"
            )
        scores = self._scores(p, 1)
        if self.class_quantiles_ is None:
            return scores <= self.quantile_
        return scores <= self.class_quantiles_[None, :]


def empirical_coverage(
    sets: np.ndarray, labels: np.ndarray, *, per_class: bool = False
) -> float | np.ndarray:
    """Share of samples whose set contains the true label.

    Parameters
    ----------
    sets : array of bool of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    per_class : bool, default False
        Return one coverage per true class (NaN for a class without samples).

    Returns
    -------
    float, or array of shape (n_classes,)

    Examples
    --------
    >>> import numpy as np
    >>> sets = np.array([[True, False], [True, True], [False, True]])
    >>> empirical_coverage(sets, np.array([0, 0, 0]))
    0.6666666666666666
    """
    s = _check_sets(sets)
    y = check_labels(labels, n_samples=s.shape[0], n_classes=s.shape[1])
    hit = s[np.arange(s.shape[0]), y].astype(np.float64)
    if not per_class:
        return float(hit.mean())
    return _per_class(hit, y, s.shape[1])


def average_set_size(
    sets: np.ndarray, labels: np.ndarray | None = None, *, per_class: bool = False
) -> float | np.ndarray:
    """Mean number of classes in a set, overall or per true class.

    Parameters
    ----------
    sets : array of bool of shape (n_samples, n_classes)
    labels : array of shape (n_samples,), optional
        Needed with ``per_class=True``.
    per_class : bool, default False
        One mean per true class (NaN for a class without samples).

    Returns
    -------
    float, or array of shape (n_classes,)

    Examples
    --------
    >>> import numpy as np
    >>> average_set_size(np.array([[True, False], [True, True]]))
    1.5
    """
    s = _check_sets(sets)
    size = s.sum(axis=1).astype(np.float64)
    if not per_class:
        return float(size.mean())
    if labels is None:
        raise ConfigError("labels: per_class=True needs the true labels; pass labels=")
    y = check_labels(labels, n_samples=s.shape[0], n_classes=s.shape[1])
    return _per_class(size, y, s.shape[1])


def _per_class(values: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    totals = np.bincount(labels, weights=values, minlength=n_classes)
    out = np.full(n_classes, np.nan)
    np.divide(totals, counts, out=out, where=counts > 0)
    return out
