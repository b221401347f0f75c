"""Calibrators: known temperatures, closed forms, sklearn equivalents, conventions, JSON form."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from modelfuse.calibration import (
    CALIBRATORS,
    HistogramBinning,
    IsotonicCalibration,
    MatrixScaling,
    PlattScaling,
    TemperatureScaling,
    VectorScaling,
    calibrator_from_json,
    expected_calibration_error,
    make_calibrator,
    negative_log_likelihood,
)
from modelfuse.errors import ConfigError, DataError


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sample_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    u = rng.uniform(size=(probs.shape[0], 1))
    return np.minimum((u > probs.cumsum(axis=1)).sum(axis=1), probs.shape[1] - 1)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(true_t: float) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(20_000, 5))
    labels = _sample_labels(rng, _softmax(logits / true_t))
    cal = TemperatureScaling().fit(logits, labels)
    assert cal.temperature_ == pytest.approx(true_t, rel=0.05)
    # argmax is unchanged; the calibrated predictor is better calibrated
    np.testing.assert_array_equal(cal.predict(logits), logits.argmax(axis=1))
    assert expected_calibration_error(cal.predict_proba(logits), labels) < 0.02


def test_temperature_is_the_nll_minimiser_by_grid() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 2.0, size=(2000, 3))
    labels = _sample_labels(rng, _softmax(logits / 1.7))
    fitted = TemperatureScaling().fit(logits, labels).temperature_
    grid = np.linspace(0.5, 4.0, 3501)
    nll = [negative_log_likelihood(_softmax(logits / t), labels) for t in grid]
    assert fitted == pytest.approx(grid[int(np.argmin(nll))], abs=2e-3)


def test_vector_and_matrix_scaling_recover_a_known_affine_map() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(0.0, 2.0, size=(30_000, 3))
    w, b = np.array([0.5, 1.0, 2.0]), np.array([0.3, -0.2, 0.0])
    labels = _sample_labels(rng, _softmax(logits * w + b))
    vec = VectorScaling().fit(logits, labels)
    # softmax is invariant to a common shift of b; compare centred biases
    np.testing.assert_allclose(vec.coef_, w, atol=0.08)
    np.testing.assert_allclose(vec.intercept_ - vec.intercept_.mean(), b - b.mean(), atol=0.08)
    mat = MatrixScaling().fit(logits, labels)
    probs_true = _softmax(logits * w + b)
    assert np.abs(mat.predict_proba(logits) - probs_true).mean() < 0.02


def test_platt_matches_sklearn_logistic_regression_on_the_log_odds() -> None:
    rng = np.random.default_rng(3)
    p1 = rng.uniform(0.01, 0.99, size=3000)
    labels = (rng.uniform(size=3000) < p1**2).astype(int)
    probs = np.stack([1 - p1, p1], axis=1)
    cal = PlattScaling(smoothing=False).fit(probs, labels)
    s = np.log(p1 / (1 - p1))[:, None]
    ref = LogisticRegression(C=1e10, max_iter=1000).fit(s, labels)
    assert cal.coef_[0] == pytest.approx(ref.coef_[0, 0], rel=1e-3)
    assert cal.intercept_[0] == pytest.approx(ref.intercept_[0], abs=1e-3)
    np.testing.assert_allclose(cal.predict_proba(probs), ref.predict_proba(s), atol=1e-4)


def test_platt_smoothing_uses_platts_targets() -> None:
    # Separable data: Platt's targets (N+ + 1)/(N+ + 2) = 3/4 and 1/(N- + 2) = 1/4 keep the
    # slope finite. A soft target t is a positive of weight t plus a negative of weight 1 - t,
    # so sklearn's weighted logistic regression is an independent reference.
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9]])
    labels = np.array([0, 0, 1, 1])
    cal = PlattScaling().fit(scores, labels)
    s = np.log(scores[:, 1] / scores[:, 0])
    t = np.where(labels == 1, 3 / 4, 1 / 4)
    ref = LogisticRegression(C=1e10, tol=1e-10, max_iter=10_000).fit(
        np.concatenate([s, s])[:, None],
        np.concatenate([np.ones(4), np.zeros(4)]),
        sample_weight=np.concatenate([t, 1 - t]),
    )
    assert cal.coef_[0] == pytest.approx(ref.coef_[0, 0], rel=1e-4)
    assert cal.intercept_[0] == pytest.approx(ref.intercept_[0], abs=1e-4)
    assert np.isfinite(cal.coef_[0])


def test_isotonic_matches_sklearn_in_the_binary_case() -> None:
    rng = np.random.default_rng(4)
    p1 = rng.uniform(size=500)
    labels = (rng.uniform(size=500) < p1**3).astype(int)
    probs = np.stack([1 - p1, p1], axis=1)
    cal = IsotonicCalibration().fit(probs, labels)
    ref = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p1, labels)
    test = rng.uniform(size=200)
    got = cal.predict_proba(np.stack([1 - test, test], axis=1))[:, 1]
    np.testing.assert_allclose(got, ref.predict(test), atol=1e-12)


def test_one_vs_rest_renormalises_by_hand() -> None:
    # Three classes; histogram binning with one bin [0, 1] per class: prior mean 1/2, strength 2.
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])
    labels = np.array([0, 0, 1, 2])
    cal = HistogramBinning(n_bins=1).fit(probs, labels)
    # q_c = (hits_c + 2 * 1/2) / (4 + 2): (3/6, 2/6, 2/6), renormalised to (3/7, 2/7, 2/7)
    np.testing.assert_allclose(cal.predict_proba(probs), np.tile([3 / 7, 2 / 7, 2 / 7], (4, 1)))
    # a vanishing prior gives the plain class frequencies (0.5, 0.25, 0.25)
    plain = HistogramBinning(n_bins=1, prior_strength=1e-12).fit(probs, labels)
    np.testing.assert_allclose(plain.predict_proba(probs), np.tile([0.5, 0.25, 0.25], (4, 1)))
    two_bins = HistogramBinning(n_bins=2).fit(probs, labels)
    # bins (0, .5] and (.5, 1] with prior means .25 and .75, strength 2:
    # class 0: (0, .5] holds {.2 yes, .3 no, .5 no} -> (1 + .5) / 5; (.5, 1] holds {.6 yes}
    #          -> (1 + 1.5) / 3
    # class 1: all in (0, .5]: {.3 no, .5 no, .3 yes, .25 no} -> (1 + .5) / 6
    # class 2: all in (0, .5]: {.1 no, .3 no, .4 no, .25 yes} -> (1 + .5) / 6
    q = np.array([[2.5 / 3, 0.25, 0.25], [0.3, 0.25, 0.25]])
    expected = q / q.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(two_bins.predict_proba(probs[:2]), expected)


def test_histogram_binning_never_gives_a_class_probability_of_zero() -> None:
    # Class 2 never occurs and class 0 is always right in its top bin: plain frequencies
    # would map them to exactly 0 and 1.
    rng = np.random.default_rng(9)
    probs = rng.dirichlet(np.ones(3), size=300)
    labels = rng.integers(0, 2, size=300)
    for binning in ("uniform", "quantile"):
        cal = HistogramBinning(n_bins=50, binning=binning).fit(probs, labels)
        out = cal.predict_proba(np.vstack([probs, np.eye(3)]))
        assert out.min() > 0 and out.max() < 1
        np.testing.assert_allclose(out.sum(axis=1), 1.0)
        for values in cal.values_:
            assert values.min() > 0 and values.max() < 1


def test_histogram_quantile_binning_is_equal_mass() -> None:
    rng = np.random.default_rng(5)
    p1 = rng.uniform(size=1000) ** 2
    labels = (rng.uniform(size=1000) < p1).astype(int)
    cal = HistogramBinning(n_bins=4, binning="quantile").fit(np.stack([1 - p1, p1], 1), labels)
    edges = cal.edges_[0]
    inner = np.searchsorted(edges, p1, side="left") - 1
    counts = np.bincount(np.clip(inner, 0, 3), minlength=4)
    assert counts.min() >= 240 and counts.max() <= 260


@pytest.mark.parametrize("method", sorted(CALIBRATORS))
def test_every_calibrator_follows_sklearn_conventions_and_round_trips_json(method: str) -> None:
    rng = np.random.default_rng(6)
    logits = rng.normal(0.0, 2.0, size=(400, 3))
    labels = _sample_labels(rng, _softmax(logits / 2))
    cal = make_calibrator(method, kind="logits")
    assert clone(cal).get_params() == cal.get_params()
    with pytest.raises(NotFittedError):
        cal.predict_proba(logits)
    cal.fit(logits, labels)
    probs = cal.predict_proba(logits)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert negative_log_likelihood(probs, labels) < negative_log_likelihood(
        _softmax(logits), labels
    )
    saved = json.loads(json.dumps(cal.to_json()))
    again = calibrator_from_json(saved)
    np.testing.assert_allclose(again.predict_proba(logits), probs, atol=1e-12)
    assert type(again) is type(cal)


def test_probabilities_kind_is_accepted_by_scaling() -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(0.0, 3.0, size=(5000, 4))
    labels = _sample_labels(rng, _softmax(logits / 2.0))
    from_logits = TemperatureScaling().fit(logits, labels)
    from_probs = TemperatureScaling(kind="probabilities").fit(_softmax(logits), labels)
    assert from_probs.temperature_ == pytest.approx(from_logits.temperature_, rel=1e-4)


def test_bad_calibration_sets() -> None:
    logits = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    with pytest.raises(DataError, match="only class 1"):
        TemperatureScaling().fit(logits, np.array([1, 1, 1]))
    with pytest.raises(DataError, match="labels must lie"):
        PlattScaling(kind="logits").fit(logits, np.array([0, 1, 2]))
    with pytest.raises(DataError, match="3 predictions"):
        IsotonicCalibration(kind="logits").fit(logits, np.array([0, 1]))
    with pytest.raises(DataError, match="NaN"):
        TemperatureScaling().fit(np.array([[np.inf, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    with pytest.raises(DataError, match="empty"):
        TemperatureScaling().fit(np.zeros((0, 2)), np.zeros(0, dtype=int))
    fitted = TemperatureScaling().fit(logits, np.array([0, 1, 0]))
    with pytest.raises(DataError, match="as in fit"):
        fitted.predict_proba(np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="unknown 'beta'"):
        make_calibrator("beta")
    with pytest.raises(ConfigError, match="\"method\": expected 'temperature', got 'platt'"):
        TemperatureScaling.from_json({"method": "platt"})


def test_scores_need_two_columns_in_fit_and_in_check_scores() -> None:
    from modelfuse.calibration.base import check_calibration_set, check_scores

    one_column = np.array([[0.2], [0.7], [0.9]])
    message = (
        "val.npy: expected shape (n_samples, n_classes) with n_classes >= 2, got (3, 1); "
        "for a binary score give two columns"
    )
    with pytest.raises(DataError) as info:
        check_scores(one_column, "logits", source="val.npy")
    assert str(info.value) == message
    with pytest.raises(DataError) as info:
        check_calibration_set(one_column, np.array([0, 1, 0]), "logits", scores_source="val.npy")
    assert str(info.value) == message
    with pytest.raises(DataError, match="^scores: expected shape"):
        TemperatureScaling().fit(np.zeros(4), np.array([0, 1, 0, 1]))
    two = np.array([[0.2, 0.8], [0.6, 0.4]])
    np.testing.assert_array_equal(check_scores(two, "probabilities"), two)


def test_numpy_parameters_survive_the_json_form() -> None:
    rng = np.random.default_rng(8)
    p1 = rng.uniform(size=200)
    probs = np.stack([1 - p1, p1], axis=1)
    labels = (rng.uniform(size=200) < p1).astype(int)
    cal = HistogramBinning(n_bins=np.int64(5)).fit(probs, labels)
    again = calibrator_from_json(json.loads(json.dumps(cal.to_json())))
    assert again.n_bins == 5
    np.testing.assert_allclose(again.predict_proba(probs), cal.predict_proba(probs))


def _penalised_objective(theta: np.ndarray, z: np.ndarray, y: np.ndarray, form: str, reg: float):
    """mean NLL + reg / n * P, written out independently of the library."""
    n, k = z.shape
    if form == "vector":
        w, b = theta[:k], theta[k:]
        scaled = z * w + b
        penalty = ((w - w.mean()) ** 2).sum() + (b**2).sum()
    else:
        W, b = theta[: k * k].reshape(k, k), theta[k * k :]
        scaled = z @ W.T + b
        penalty = (W**2).sum() - (np.diag(W) ** 2).sum() + (b**2).sum()
    log_p = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
    return -log_p[np.arange(n), y].mean() + reg / n * penalty


@pytest.mark.parametrize("form", ["vector", "matrix"])
@pytest.mark.parametrize("reg", [0.0, 50.0])
def test_regularised_scaling_minimises_the_written_out_objective(form: str, reg: float) -> None:
    from scipy.optimize import minimize

    rng = np.random.default_rng(10)
    z = rng.normal(0.0, 2.0, size=(150, 3))
    y = _sample_labels(rng, _softmax(z * np.array([0.5, 1.0, 1.5]) + 0.3))
    cls = VectorScaling if form == "vector" else MatrixScaling
    cal = cls(reg=reg).fit(z, y)
    fitted = np.concatenate([cal.coef_.ravel(), cal.intercept_])
    # an independent optimiser (Nelder-Mead then BFGS, numerical gradients) on the formula
    start = np.concatenate([np.ones(3) if form == "vector" else np.eye(3).ravel(), np.zeros(3)])
    reference = minimize(_penalised_objective, start, args=(z, y, form, reg), method="BFGS")
    best = _penalised_objective(reference.x, z, y, form, reg)
    assert _penalised_objective(fitted, z, y, form, reg) == pytest.approx(best, abs=1e-7)
    if reg > 0:  # strictly convex in the penalised directions: the same parameters
        np.testing.assert_allclose(fitted, reference.x, atol=2e-3)


def test_strong_regularisation_shrinks_vector_to_temperature_and_matrix_to_its_diagonal() -> None:
    rng = np.random.default_rng(11)
    z = rng.normal(0.0, 3.0, size=(400, 4))
    y = _sample_labels(rng, _softmax(z * np.array([0.3, 0.6, 0.9, 1.2]) + 0.5))
    vec = VectorScaling(reg=1e9).fit(z, y)
    temperature = TemperatureScaling().fit(z, y).temperature_
    np.testing.assert_allclose(vec.coef_, 1 / temperature, rtol=1e-3)
    np.testing.assert_allclose(vec.intercept_, 0.0, atol=1e-4)
    mat = MatrixScaling(reg=1e9).fit(z, y)
    assert np.abs(mat.coef_ - np.diag(np.diag(mat.coef_))).max() < 1e-4
    np.testing.assert_allclose(mat.intercept_, 0.0, atol=1e-4)
    free = VectorScaling(reg=0.0).fit(z, y)  # the penalty moved the fit away from the MLE
    assert np.abs(free.coef_ - vec.coef_).max() > 0.1


def test_regularisation_helps_matrix_scaling_on_a_small_set() -> None:
    # 10 classes, 110 parameters, 100 calibration samples: held-out NLL, regularised or not
    rng = np.random.default_rng(12)
    w = rng.uniform(0.3, 0.8, size=10)
    z = rng.normal(0.0, 3.0, size=(5100, 10))
    y = _sample_labels(rng, _softmax(z * w))
    train, test = slice(0, 100), slice(100, None)
    nll = {
        reg: negative_log_likelihood(
            MatrixScaling(reg=reg).fit(z[train], y[train]).predict_proba(z[test]), y[test]
        )
        for reg in (0.0, 100.0)
    }
    assert nll[100.0] < nll[0.0] - 0.5


def test_the_saved_form_holds_the_temperature_itself() -> None:
    z = np.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    cal = TemperatureScaling().fit(z, np.array([0, 1, 1, 1]))
    saved = cal.to_json()
    assert saved["state"] == {"n_classes_": 2, "temperature_": cal.temperature_}
    assert cal.temperature_ > 1
    np.testing.assert_allclose(cal.coef_, [1 / cal.temperature_])


def test_non_finite_fitted_values_are_refused(monkeypatch) -> None:
    import modelfuse.calibration.scaling as scaling

    def broken(logits, labels, form, **kwargs):
        k = logits.shape[1]
        return np.full(k, np.nan), np.zeros(k)

    monkeypatch.setattr(scaling, "fit_logit_scaling", broken)
    z = np.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    with pytest.raises(DataError, match="vector calibration: the fit gave non-finite values"):
        VectorScaling().fit(z, np.array([0, 1, 1, 1]))


def test_parameters_out_of_range_are_refused_at_fit() -> None:
    z = np.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    y = np.array([0, 1, 1, 1])
    with pytest.raises(ConfigError, match='"n_bins": expected an integer in \\[1, 10000\\]'):
        HistogramBinning(n_bins=10**9).fit(z, y)
    with pytest.raises(ConfigError, match='"reg": expected a finite number'):
        MatrixScaling(reg=float("nan")).fit(z, y)
    with pytest.raises(ConfigError, match='"kind": expected one of'):
        TemperatureScaling(kind="auto").fit(z, y)  # type: ignore[arg-type]


def test_matrix_scaling_refuses_more_classes_than_it_can_hold() -> None:
    z = np.zeros((4, 1001))
    z[:, 0] = 1.0
    with pytest.raises(DataError, match="matrix scaling: 1001 classes would need 1003002 param"):
        MatrixScaling().fit(z, np.array([0, 1, 2, 3]))


def test_a_temperature_saved_as_its_inverse_by_modelfuse_0_1_0_still_loads() -> None:
    z = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    old = {
        "method": "temperature",
        "params": {"kind": "logits", "max_iter": 500},
        "state": {
            "n_classes_": 3,
            "coef_": {"array": [0.5], "dtype": "float64"},
            "intercept_": {"array": [0.0, 0.0, 0.0], "dtype": "float64"},
        },
    }
    loaded = calibrator_from_json(old)
    assert loaded.temperature_ == 2.0
    expected = np.exp(z / 2.0) / np.exp(z / 2.0).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(loaded.predict_proba(z), expected, rtol=1e-12)
    old["state"]["coef_"] = [0.0]
    with pytest.raises(ConfigError, match="state.coef_"):
        calibrator_from_json(old)
