"""Metrics against scikit-learn and the calibration module; their sums against direct calls."""

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

from modelfuse.calibration import metrics as calibration_metrics
from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation import METRICS, accuracy, auroc, balanced_accuracy, get_metric, macro_f1


def _probs(rng, n, k, signal=1.0):
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True), y


@pytest.mark.parametrize("k", [2, 3, 7])
def test_label_metrics_match_sklearn(k):
    rng = np.random.default_rng(k)
    p, y = _probs(rng, 500, k)
    pred = p.argmax(axis=1)
    assert accuracy(p, y) == pytest.approx(accuracy_score(y, pred))
    assert balanced_accuracy(p, y) == pytest.approx(balanced_accuracy_score(y, pred))
    assert macro_f1(p, y) == pytest.approx(f1_score(y, pred, average="macro"))


def test_macro_f1_averages_over_classes_in_labels_or_predictions_like_sklearn():
    # class 2 never occurs in labels nor predictions; class 1 only in predictions
    p = np.eye(3)[[0, 1, 0, 0]]
    y = np.array([0, 0, 0, 0])
    pred = p.argmax(axis=1)
    assert macro_f1(p, y) == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert balanced_accuracy(p, y) == pytest.approx(0.75)


def test_auroc_binary_with_ties_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    score = np.round(rng.random(300) * 0.5 + 0.3 * y, 1)  # coarse: many ties
    p = np.stack([1 - score, score], axis=1)
    assert auroc(p, y) == pytest.approx(roc_auc_score(y, score))


@pytest.mark.parametrize("average", ["macro", "weighted"])
def test_auroc_one_vs_rest_matches_sklearn(average):
    rng = np.random.default_rng(1)
    p, y = _probs(rng, 400, 4, signal=0.7)
    expected = roc_auc_score(y, p, multi_class="ovr", average=average)
    assert auroc(p, y, average=average) == pytest.approx(expected)


def test_logits_are_turned_into_probabilities():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(50, 3))
    y = rng.integers(0, 3, 50)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert auroc(logits, y, kind="logits") == pytest.approx(auroc(p, y))
    assert accuracy(logits, y, kind="logits") == accuracy(p, y)


def test_calibration_metrics_come_from_the_calibration_module():
    rng = np.random.default_rng(3)
    p, y = _probs(rng, 300, 3)
    assert METRICS["nll"].function(p, y) == calibration_metrics.negative_log_likelihood(p, y)
    assert METRICS["brier"].function(p, y) == calibration_metrics.brier_score(p, y)
    assert METRICS["ece"].function(p, y) == calibration_metrics.expected_calibration_error(p, y)


@pytest.mark.parametrize("name", ["accuracy", "balanced_accuracy", "macro_f1", "nll", "brier"])
def test_sums_reproduce_the_metric_on_weighted_resamples(name):
    # the metric of a resample given by counts equals the metric on the repeated samples
    spec = get_metric(name)
    rng = np.random.default_rng(4)
    p, y = _probs(rng, 120, 4)
    keys = spec.keys(p, y)
    assert keys is not None
    rows = spec.rows(keys, 4)
    for _ in range(5):
        counts = rng.multinomial(len(y), np.full(len(y), 1 / len(y)))
        index = np.repeat(np.arange(len(y)), counts)
        sums = np.asarray(rows.T @ counts).ravel()
        assert spec.from_sums(sums, len(y)) == pytest.approx(spec.function(p[index], y[index]))


def test_inputs_are_not_modified():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(30, 3))
    y = rng.integers(0, 3, 30)
    before = logits.copy()
    auroc(logits, y, kind="logits")
    macro_f1(logits, y, kind="logits")
    np.testing.assert_array_equal(logits, before)


def test_unknown_metric_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="accuracy.*auroc"):
        get_metric("acuracy")


def test_auroc_undefined_when_a_class_is_missing():
    p = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    with pytest.raises(DataError, match="class has no positive"):
        auroc(p, np.array([0, 1]))


def test_bad_predictions_are_rejected():
    with pytest.raises(DataError, match="sum to 1"):
        accuracy(np.array([[0.5, 0.6]]), np.array([0]))
    with pytest.raises(DataError, match="labels"):
        accuracy(np.eye(2), np.array([0, 2]))
    with pytest.raises(DataError, match="n_classes"):
        accuracy(np.ones(3), np.array([0, 0, 0]))
    with pytest.raises(ConfigError, match="average"):
        auroc(np.eye(2), np.array([0, 1]), average="micro")


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("decimals", [None, 1])
def test_auroc_of_weighted_samples_matches_sklearn_sample_weight(k, decimals):
    # the batched AUROC the bootstrap uses: one row of integer weights per resample
    rng = np.random.default_rng(k)
    p, y = _probs(rng, 200, k)
    if decimals is not None:  # ties between scores
        p = np.round(p, decimals)
        p = p / p.sum(axis=1, keepdims=True)
    weights = np.stack([np.bincount(rng.integers(0, 200, 200), minlength=200) for _ in range(4)])
    got = METRICS["auroc"].on_weights(p, y, weights.astype(np.float32))
    for row, value in zip(weights, got):
        if k == 2:
            expected = roc_auc_score(y, p[:, 1], sample_weight=row)
        else:
            keep = row > 0
            expected = np.mean([
                roc_auc_score(y[keep] == c, p[keep, c], sample_weight=row[keep]) for c in range(k)
            ])
        assert value == pytest.approx(expected)


def test_jackknife_of_a_batched_metric_deletes_one_sample_at_a_time():
    from modelfuse.evaluation.bootstrap import _Plan

    rng = np.random.default_rng(6)
    p, y = _probs(rng, 60, 3)
    values, weights = _Plan(get_metric("auroc"), [p], y, [1.0]).jackknife(rng)
    expected = [auroc(np.delete(p, i, axis=0), np.delete(y, i)) for i in range(60)]
    np.testing.assert_allclose(values, expected)
    np.testing.assert_array_equal(weights, np.ones(60))


def test_ece_from_per_bin_sums_equals_the_calibration_module_on_resamples():
    # ECE = sum_b |sum_{i in b} (hit_i - conf_i)| / n: the sums path must give the calibration
    # module's value on any resample (index rows with repeats)
    from modelfuse.calibration.metrics import expected_calibration_error
    from modelfuse.evaluation.metrics import METRICS

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(400, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, 4, 400)
    spec = METRICS["ece"]
    keys = spec.keys(probs, y)
    assert keys is not None
    table = spec.rows(keys, 4).toarray()
    rows = rng.integers(0, 400, size=(50, 400))
    by_sums = spec.from_sums(table[rows].sum(axis=1), 400)
    np.testing.assert_allclose(by_sums, expected_calibration_error(probs, y, indices=rows),
                               rtol=1e-12, atol=1e-14)
