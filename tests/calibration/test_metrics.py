"""Calibration metrics against hand-worked examples, naive loops, closed forms and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss

from modelfuse.calibration.metrics import (
    adaptive_calibration_error,
    brier_score,
    calibration_bins,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)
from modelfuse.errors import ConfigError, DataError

# Six samples, three classes. Top-label confidence and hit, worked out by hand:
#   conf .5 hit, conf .4 miss, conf .7 hit, conf .6 miss, conf .9 hit, conf .8 hit
PROBS = np.array(
    [
        [0.5, 0.3, 0.2],
        [0.4, 0.35, 0.25],
        [0.1, 0.7, 0.2],
        [0.6, 0.3, 0.1],
        [0.05, 0.05, 0.9],
        [0.8, 0.1, 0.1],
    ]
)
LABELS = np.array([0, 1, 1, 2, 2, 0])


def test_uniform_bins_by_hand_all_norms() -> None:
    # 4 bins (0,.25] (.25,.5] (.5,.75] (.75,1]; .5 lies on an edge and goes to (.25,.5].
    # bin 2: {.5 hit, .4 miss}  conf .45 acc .5 gap .05
    # bin 3: {.7 hit, .6 miss}  conf .65 acc .5 gap .15
    # bin 4: {.9 hit, .8 hit}   conf .85 acc 1  gap .15
    l1 = (2 / 6) * 0.05 + (2 / 6) * 0.15 + (2 / 6) * 0.15
    l2 = math.sqrt((2 / 6) * 0.05**2 + (2 / 6) * 0.15**2 + (2 / 6) * 0.15**2)
    mx = 0.15
    for norm, expected in (("l1", l1), ("l2", l2), ("max", mx)):
        got = expected_calibration_error(PROBS, LABELS, n_bins=4, norm=norm)
        assert got == pytest.approx(expected, abs=1e-12), norm
    assert maximum_calibration_error(PROBS, LABELS, n_bins=4) == pytest.approx(mx)
    # With [lower, upper) bins, .5 would join bin 3 and l1 would be 0.15 instead.
    assert abs(l1 - 0.15) > 0.03


def test_quantile_bins_by_hand_all_norms() -> None:
    # sorted: .4 miss, .5 hit, .6 miss, .7 hit, .8 hit, .9 hit; 5 equal-mass bins: 2,1,1,1,1
    # {.4,.5} conf .45 acc .5 gap .05; {.6} gap .6; {.7} gap .3; {.8} gap .2; {.9} gap .1
    w = np.array([2, 1, 1, 1, 1]) / 6
    gaps = np.array([0.05, 0.6, 0.3, 0.2, 0.1])
    expected = {
        "l1": float((w * gaps).sum()),
        "l2": math.sqrt(float((w * gaps**2).sum())),
        "max": 0.6,
    }
    for norm, value in expected.items():
        got = expected_calibration_error(PROBS, LABELS, n_bins=5, binning="quantile", norm=norm)
        assert got == pytest.approx(value, abs=1e-12), norm
    assert adaptive_calibration_error(PROBS, LABELS, n_bins=5) == pytest.approx(expected["l1"])


def _naive_classwise(probs, labels, n_bins, norm):
    """Loop over classes and bins with explicit (lower, upper] masks."""
    edges = np.linspace(0, 1, n_bins + 1)
    errors = []
    for c in range(probs.shape[1]):
        conf = probs[:, c]
        hit = (labels == c).astype(float)
        gaps, weights = [], []
        for b in range(n_bins):
            lo, hi = edges[b], edges[b + 1]
            mask = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
            if mask.any():
                gaps.append(abs(hit[mask].mean() - conf[mask].mean()))
                weights.append(mask.mean())
        gaps, weights = np.array(gaps), np.array(weights)
        if norm == "l1":
            errors.append((weights * gaps).sum())
        elif norm == "l2":
            errors.append(math.sqrt((weights * gaps**2).sum()))
        else:
            errors.append(gaps.max())
    return float(np.mean(errors))


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_classwise_matches_a_naive_loop(norm: str) -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=500)
    labels = rng.integers(0, 4, size=500)
    got = expected_calibration_error(probs, labels, n_bins=10, norm=norm, classwise=True)
    assert got == pytest.approx(_naive_classwise(probs, labels, 10, norm), abs=1e-12)


def test_calibrated_predictor_has_ece_near_zero_and_a_shifted_one_the_gap() -> None:
    rng = np.random.default_rng(1)
    n = 200_000
    conf = rng.uniform(0.6, 1.0, size=n)
    probs = np.stack([1 - conf, conf], axis=1)
    calibrated = (rng.uniform(size=n) < conf).astype(int)  # P(label 1) = conf
    shifted = (rng.uniform(size=n) < conf - 0.1).astype(int)  # 0.1 less often right
    assert expected_calibration_error(probs, calibrated) < 0.01
    assert expected_calibration_error(probs, shifted) == pytest.approx(0.1, abs=0.01)
    assert adaptive_calibration_error(probs, shifted) == pytest.approx(0.1, abs=0.01)


def test_brier_against_sklearn_and_its_binary_convention() -> None:
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(5), size=300)
    labels = rng.integers(0, 5, size=300)
    onehot = np.eye(5)[labels]
    assert brier_score(probs, labels) == pytest.approx(((probs - onehot) ** 2).sum(1).mean())
    assert brier_score(probs, labels) == pytest.approx(
        brier_score_loss(labels, probs, labels=list(range(5)))
    )
    p1 = rng.uniform(size=300)
    y = rng.integers(0, 2, size=300)
    binary = np.stack([1 - p1, p1], axis=1)
    assert brier_score(binary, y) == pytest.approx(2 * brier_score_loss(y, p1))


def test_nll_against_sklearn_and_clipping() -> None:
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(3), size=200)
    labels = rng.integers(0, 3, size=200)
    assert negative_log_likelihood(probs, labels) == pytest.approx(
        log_loss(labels, probs, labels=[0, 1, 2])
    )
    zero = np.array([[1.0, 0.0]])
    assert negative_log_likelihood(zero, np.array([1]), eps=1e-6) == pytest.approx(-math.log(1e-6))


def test_float32_input_gives_the_float64_answer() -> None:
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(10), size=5000)
    labels = rng.integers(0, 10, size=5000)
    p32 = probs.astype(np.float32)
    for fn in (brier_score, negative_log_likelihood, adaptive_calibration_error):
        assert fn(p32, labels) == pytest.approx(fn(p32.astype(np.float64), labels), rel=1e-6)
    # top-label ECE: same bins unless a float32 confidence crosses an edge
    assert expected_calibration_error(p32, labels) == pytest.approx(
        expected_calibration_error(p32.astype(np.float64), labels), abs=1e-6
    )


@pytest.mark.parametrize(
    ("fn", "kwargs"),
    [
        (expected_calibration_error, {}),
        (expected_calibration_error, {"norm": "l2"}),
        (expected_calibration_error, {"norm": "max", "binning": "quantile"}),
        (expected_calibration_error, {"classwise": True}),
        (expected_calibration_error, {"classwise": True, "binning": "quantile"}),
        (maximum_calibration_error, {}),
        (adaptive_calibration_error, {}),
        (brier_score, {}),
        (negative_log_likelihood, {}),
    ],
)
def test_resample_indices_equal_a_loop_over_rows(fn, kwargs) -> None:
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(3) * 0.5, size=400)
    labels = rng.integers(0, 3, size=400)
    rows = rng.integers(0, 400, size=(7, 400))
    batched = fn(probs, labels, indices=rows, **kwargs)
    assert batched.shape == (7,)
    looped = [fn(probs[r], labels[r], **kwargs) for r in rows]
    np.testing.assert_allclose(batched, looped, rtol=1e-10, atol=1e-12)


def test_calibration_bins_by_hand() -> None:
    bins = calibration_bins(PROBS, LABELS, n_bins=4)
    np.testing.assert_array_equal(bins["count"], [0, 2, 2, 2])
    np.testing.assert_allclose(bins["confidence"][1:], [0.45, 0.65, 0.85])
    np.testing.assert_allclose(bins["accuracy"][1:], [0.5, 0.5, 1.0])
    assert np.isnan(bins["accuracy"][0])
    quantile = calibration_bins(PROBS, LABELS, n_bins=3, binning="quantile")
    np.testing.assert_allclose(quantile["lower"], [0.4, 0.6, 0.8])
    np.testing.assert_allclose(quantile["upper"], [0.5, 0.7, 0.9])


def test_bad_inputs_raise_data_or_config_errors() -> None:
    with pytest.raises(DataError, match="sum to 1"):
        expected_calibration_error(PROBS * 0.9, LABELS)
    with pytest.raises(DataError, match="labels must lie"):
        expected_calibration_error(PROBS, LABELS + 1)
    with pytest.raises(DataError, match="6 predictions"):
        brier_score(PROBS, LABELS[:5])
    with pytest.raises(DataError, match="NaN"):
        negative_log_likelihood(np.where(PROBS == 0.5, np.nan, PROBS), LABELS)
    with pytest.raises(DataError, match="empty"):
        expected_calibration_error(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(DataError, match="indices"):
        brier_score(PROBS, LABELS, indices=np.array([[0, 6]]))
    with pytest.raises(ConfigError, match="norm"):
        expected_calibration_error(PROBS, LABELS, norm="l3")
    with pytest.raises(ConfigError, match="binning"):
        expected_calibration_error(PROBS, LABELS, binning="equal")
    with pytest.raises(ConfigError, match="n_bins"):
        expected_calibration_error(PROBS, LABELS, n_bins=0)
