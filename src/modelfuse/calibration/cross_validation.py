"""Held-out calibration metrics by stratified K-fold cross-validation.

A calibrator scored on the samples it was fitted on looks better than it is,
and the more parameters it has (vector and matrix scaling, histogram
binning, isotonic regression) the larger the flattery. Cross-validation fits
it on K - 1 folds, predicts the K-th, and scores the pooled out-of-fold
predictions: what the calibrator would do on new samples.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold

from modelfuse.calibration.base import Calibrator, check_calibration_set
from modelfuse.calibration.metrics import (
    MAX_BINS,
    expected_calibration_error,
    negative_log_likelihood,
)
from modelfuse.calibration.softmax import to_probabilities
from modelfuse.errors import ConfigError, DataError

__all__ = ["CrossValidatedMetrics", "cross_validated_metrics", "stratified_folds"]

# More folds than this only repeat nearly the same fit.
MAX_FOLDS = 100


@dataclass(frozen=True)
class CrossValidatedMetrics:
    """Held-out metrics of a calibrator, from :func:`cross_validated_metrics`.

    Attributes
    ----------
    nll, ece : float
        Mean negative log-likelihood and top-label ECE of the pooled
        out-of-fold calibrated probabilities.
    nll_uncalibrated, ece_uncalibrated : float
        The same metrics of the uncalibrated probabilities of the same
        samples (nothing is fitted, so in-sample is held-out for them).
    n_splits : int
    probabilities : array of shape (n_samples, n_classes)
        The out-of-fold calibrated probabilities.
    """

    nll: float
    ece: float
    nll_uncalibrated: float
    ece_uncalibrated: float
    n_splits: int
    probabilities: np.ndarray


def stratified_folds(
    labels: np.ndarray, n_splits: int, random_state: int | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shuffled stratified K-fold (train, test) index pairs, every train part holding two classes.

    ``sklearn.model_selection.StratifiedKFold(n_splits, shuffle=True,
    random_state=random_state)``, with its warning about classes rarer than
    the folds silenced (a rare class then sits in some folds only, which is
    what stratification can do) and one-class training parts refused.

    Raises
    ------
    ConfigError
        ``n_splits`` is not an integer in [2, 100].
    DataError
        The most frequent class has fewer samples than folds, or a training
        part would hold one class only.

    Examples
    --------
    >>> import numpy as np
    >>> folds = stratified_folds(np.array([0, 1] * 5), 5, 0)
    >>> [len(test) for _, test in folds]
    [2, 2, 2, 2, 2]
    """
    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)):
        raise ConfigError(f"cv: expected an integer number of folds, got {str(n_splits)[:40]!r}")
    if not 2 <= n_splits <= MAX_FOLDS:
        raise ConfigError(f"cv: expected 2 to {MAX_FOLDS} folds, got {n_splits}")
    counts = np.bincount(labels)
    if counts.max() < n_splits:
        raise DataError(
            f"labels: the most frequent class has {counts.max()} samples, fewer than the "
            f"{n_splits} cross-validation folds; use fewer folds or more samples"
        )
    splitter = StratifiedKFold(n_splits=int(n_splits), shuffle=True, random_state=random_state)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class", category=UserWarning)
        folds = list(splitter.split(np.zeros(labels.size), labels))
    for train, _ in folds:
        present = np.unique(labels[train])
        if present.size < 2:
            raise DataError(
                f"labels: a training part of the {n_splits}-fold cross-validation holds only "
                f"class {int(present[0])}; give more samples of the other classes"
            )
    return folds


def cross_validated_metrics(
    calibrator: Calibrator,
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    cv: int = 5,
    n_bins: int = 15,
    random_state: int | None = 0,
) -> CrossValidatedMetrics:
    """Held-out NLL and ECE of ``calibrator`` by stratified K-fold cross-validation.

    For each of the ``cv`` folds of a shuffled ``StratifiedKFold`` (seeded
    by ``random_state``), a clone of ``calibrator`` is fitted on the other
    folds and predicts this one; NLL and ECE are computed once on the pooled
    out-of-fold probabilities. ``calibrator`` itself is not modified.

    Parameters
    ----------
    calibrator : Calibrator
        An estimator of :mod:`modelfuse.calibration` (its ``kind`` says what
        ``scores`` hold); fitted or not, it is cloned.
    scores : array of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    cv : int, default 5
        Number of folds, 2 to 100.
    n_bins : int, default 15
        Equal-width bins of the ECE.
    random_state : int, optional
        Seeds the fold shuffle.

    Returns
    -------
    CrossValidatedMetrics

    Raises
    ------
    DataError
        Bad scores or labels, or too few samples of a class for the folds.
    ConfigError
        ``cv`` or ``n_bins`` out of range.

    Examples
    --------
    >>> import numpy as np
    >>> from modelfuse.calibration import TemperatureScaling
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(0, 3, size=(500, 3)); y = rng.integers(0, 3, size=500)
    >>> held_out = cross_validated_metrics(TemperatureScaling(), z, y, cv=5)
    >>> bool(held_out.nll < held_out.nll_uncalibrated)  # random labels: soften
    True
    """
    if not isinstance(calibrator, Calibrator):
        raise ConfigError(
            f"calibrator: expected a modelfuse calibrator, got {type(calibrator).__name__}"
        )
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)):
        raise ConfigError(f"n_bins: expected an integer, got {str(n_bins)[:40]!r}")
    if not 1 <= n_bins <= MAX_BINS:
        raise ConfigError(f"n_bins: expected an integer in [1, {MAX_BINS}], got {n_bins}")
    s, y = check_calibration_set(scores, labels, calibrator.kind)
    out = np.zeros(s.shape, dtype=np.float64)
    for train, test in stratified_folds(y, cv, random_state):
        fitted: Any = clone(calibrator).fit(s[train], y[train])
        out[test] = fitted.predict_proba(s[test])
    before = to_probabilities(s, calibrator.kind)
    return CrossValidatedMetrics(
        nll=negative_log_likelihood(out, y),
        ece=expected_calibration_error(out, y, n_bins=n_bins),
        nll_uncalibrated=negative_log_likelihood(before, y),
        ece_uncalibrated=expected_calibration_error(before, y, n_bins=n_bins),
        n_splits=int(cv),
        probabilities=out,
    )
