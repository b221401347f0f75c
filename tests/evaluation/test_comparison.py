"""compare_predictions: Holm over the raw tests, the reference, the Friedman blocks, bad input."""

import dataclasses

import numpy as np
import pytest

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation import (
    accuracy,
    compare_predictions,
    friedman_test,
    holm,
    mcnemar,
    paired_bootstrap,
)


def _candidates(n=600, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)

    def make(acc):
        hard = np.where(rng.random(n) < acc, y, (y + 1) % 3)
        return np.eye(3)[hard] * 0.7 + 0.1

    return y, {"base": make(0.7), "soup": make(0.74), "ties": make(0.85), "dare": make(0.69)}


def test_each_candidate_against_the_reference_with_holm():
    y, preds = _candidates()
    c = compare_predictions(preds, y, reference="soup", test="mcnemar", n_resamples=300)
    assert c.reference == "soup"
    assert [r.name for r in c.candidates] == list(preds)
    ref = next(r for r in c.candidates if r.name == "soup")
    assert ref.difference is None and ref.test is None
    others = [r for r in c.candidates if r.name != "soup"]
    raw = [mcnemar(y, preds[r.name], preds["soup"]).pvalue for r in others]
    np.testing.assert_allclose([r.raw_pvalue for r in others], raw)
    np.testing.assert_allclose([r.test.pvalue for r in others], holm(raw))
    for r in others:
        assert r.estimate.statistic == pytest.approx(accuracy(preds[r.name], y))
        expected = accuracy(preds[r.name], y) - accuracy(preds["soup"], y)
        assert r.difference.statistic == pytest.approx(expected)
        assert r.difference.ci[0] <= r.difference.statistic <= r.difference.ci[1]


def test_the_difference_interval_is_the_paired_bootstrap():
    y, preds = _candidates(seed=1)
    c = compare_predictions({"a": preds["base"], "b": preds["ties"]}, y, metric="nll",
                            n_resamples=400, random_state=3)
    row = c.candidates[1]
    again = paired_bootstrap(preds["ties"], preds["base"], y, metric="nll", n_resamples=400,
                             random_state=np.random.default_rng(0))
    assert row.difference.statistic == pytest.approx(again.statistic)
    width = again.ci[1] - again.ci[0]
    assert row.difference.ci == pytest.approx(again.ci, abs=0.2 * width)
    assert c.friedman is None  # two candidates: no ranking


def test_friedman_over_disjoint_blocks_for_three_or_more():
    y, preds = _candidates(seed=2)
    c = compare_predictions(preds, y, n_blocks=6, n_resamples=200)
    assert c.block_scores.shape == (6, 4)
    # the blocks partition the samples into (nearly) equal parts: their mean is the accuracy
    for j, name in enumerate(preds):
        assert c.block_scores[:, j].mean() == pytest.approx(accuracy(preds[name], y), abs=0.005)
    assert c.friedman is not None
    expected = friedman_test(c.block_scores, names=list(preds))
    assert c.friedman.statistic == pytest.approx(expected.statistic)
    assert c.friedman.mean_ranks[list(preds).index("ties")] == min(c.friedman.mean_ranks)


def test_comparison_is_seeded_and_frozen():
    y, preds = _candidates(seed=3)
    one = compare_predictions(preds, y, n_resamples=200, random_state=7)
    two = compare_predictions(preds, y, n_resamples=200, random_state=7)
    assert [r.estimate.ci for r in one.candidates] == [r.estimate.ci for r in two.candidates]
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.reference = "x"
    assert str(one).count("\n") == len(preds) + 1  # header, candidates, Friedman


def test_bad_input_is_rejected():
    y, preds = _candidates()
    with pytest.raises(ConfigError, match="not a candidate.*base, soup"):
        compare_predictions(preds, y, reference="nope")
    with pytest.raises(ConfigError, match="unknown metric"):
        compare_predictions(preds, y, metric="f2")
    with pytest.raises(ConfigError, match="McNemar"):
        compare_predictions(preds, y, metric="nll", test="mcnemar")
    with pytest.raises(DataError, match="'soup'"):
        compare_predictions({"base": preds["base"], "soup": preds["soup"][:, :2]}, y)
    with pytest.raises(DataError, match="labels"):
        compare_predictions(preds, y[:-1])
    with pytest.raises(DataError, match="at least one"):
        compare_predictions({}, y)
