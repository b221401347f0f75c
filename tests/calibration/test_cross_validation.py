"""Cross-validated calibration metrics against a hand-rolled K-fold loop."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from modelfuse.calibration import (
    HistogramBinning,
    MatrixScaling,
    TemperatureScaling,
    VectorScaling,
    cross_validated_metrics,
)
from modelfuse.errors import ConfigError, DataError


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _data(n: int = 600, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, k))
    u = rng.uniform(size=(n, 1))
    labels = np.minimum((u > _softmax(logits / 2.0).cumsum(axis=1)).sum(axis=1), k - 1)
    return logits, labels


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-12))))


def _ece(p: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    # Guo et al.: bins (lower, upper] over [0, 1], a confidence of 0 in the first
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for b in range(n_bins):
        inside = (conf > edges[b]) & (conf <= edges[b + 1])
        if b == 0:
            inside |= conf <= 0
        if inside.any():
            total += inside.sum() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return total / len(y)


@pytest.mark.parametrize(
    "calibrator",
    [TemperatureScaling(), VectorScaling(), MatrixScaling(), HistogramBinning(kind="logits")],
    ids=["temperature", "vector", "matrix", "histogram"],
)
def test_equals_a_hand_rolled_stratified_k_fold_loop(calibrator) -> None:
    logits, labels = _data()
    got = cross_validated_metrics(calibrator, logits, labels, cv=4, random_state=3)
    out = np.zeros(logits.shape)
    folds = StratifiedKFold(n_splits=4, shuffle=True, random_state=3)
    for train, test in folds.split(logits, labels):
        fitted = type(calibrator)(**calibrator.get_params()).fit(logits[train], labels[train])
        out[test] = fitted.predict_proba(logits[test])
    np.testing.assert_allclose(got.probabilities, out, rtol=1e-12, atol=1e-15)
    assert got.nll == pytest.approx(_nll(out, labels), rel=1e-12)
    assert got.ece == pytest.approx(_ece(out, labels), rel=1e-9)
    assert got.nll_uncalibrated == pytest.approx(_nll(_softmax(logits), labels), rel=1e-12)
    assert got.ece_uncalibrated == pytest.approx(_ece(_softmax(logits), labels), rel=1e-9)
    assert got.n_splits == 4
    assert not hasattr(calibrator, "n_classes_")  # the given estimator is not fitted


def test_held_out_is_worse_than_in_sample_for_a_flexible_calibrator() -> None:
    logits, labels = _data(n=120, k=6, seed=1)
    cal = MatrixScaling(reg=0.0)
    in_sample = _nll(cal.fit(logits, labels).predict_proba(logits), labels)
    held_out = cross_validated_metrics(MatrixScaling(reg=0.0), logits, labels, cv=5).nll
    assert held_out > in_sample + 0.1


def test_the_seed_decides_the_folds() -> None:
    logits, labels = _data(n=200)
    a = cross_validated_metrics(VectorScaling(), logits, labels, random_state=0)
    b = cross_validated_metrics(VectorScaling(), logits, labels, random_state=0)
    c = cross_validated_metrics(VectorScaling(), logits, labels, random_state=1)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert not np.array_equal(a.probabilities, c.probabilities)


def test_too_few_samples_for_the_folds_are_refused() -> None:
    logits = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    labels = np.array([0, 1, 0, 1, 0])
    with pytest.raises(DataError, match="most frequent class has 3 samples, fewer than the 5"):
        cross_validated_metrics(TemperatureScaling(), logits, labels, cv=5)
    # one sample of class 1: the fold that holds it trains on class 0 alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's warning about rare classes is not shown
        with pytest.raises(DataError, match="training part of the 2-fold .* holds only class 0"):
            cross_validated_metrics(
                TemperatureScaling(), logits[:3], np.array([0, 1, 0]), cv=2, random_state=0
            )


def test_bad_options_are_refused() -> None:
    logits, labels = _data(n=50)
    with pytest.raises(ConfigError, match="cv: expected 2 to 100 folds, got 1"):
        cross_validated_metrics(TemperatureScaling(), logits, labels, cv=1)
    with pytest.raises(ConfigError, match="n_bins: expected an integer in \\[1, 10000\\]"):
        cross_validated_metrics(TemperatureScaling(), logits, labels, n_bins=10**9)
    with pytest.raises(ConfigError, match="expected a modelfuse calibrator"):
        cross_validated_metrics("temperature", logits, labels)  # type: ignore[arg-type]
