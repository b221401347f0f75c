"""compare_predictions: Holm over the raw tests, the reference, the Friedman blocks, bad input."""

import dataclasses

import numpy as np
import pytest

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation import (
    accuracy,
    choose_reference,
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
    assert str(one).count("\n") == len(preds) + 1 + len(one.notes)  # + Friedman, notes


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


def _holm_reference(p):
    # Holm written out: sort, multiply the i-th smallest by (m - i), running maximum, cap at 1
    order = np.argsort(p)
    m = len(p)
    out, running = np.empty(m), 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out


def test_identical_candidates_are_one_model_counted_once():
    y, preds = _candidates(seed=4)
    preds = {**preds, "wise_ft": preds["base"].copy(), "greedy": preds["ties"].copy()}
    c = compare_predictions(preds, y, reference="base", test="mcnemar", n_resamples=200)
    assert [r.name for r in c.candidates] == list(preds)  # one entry per name, input order
    assert [m.label for m in c.models] == ["base = wise_ft", "soup", "ties = greedy", "dare"]
    assert c.family_size == 3
    copy = c.candidate("wise_ft")
    assert copy.same_as == ("base",) and copy.significant is False
    assert copy.difference.statistic == 0.0 and copy.difference.ci == (0.0, 0.0)
    assert copy.test.pvalue == 1.0 and "outside the Holm family" in copy.test.method
    assert c.candidate("base").difference is None
    assert c.candidate("greedy").test is c.candidate("ties").test
    distinct = ["soup", "ties", "dare"]
    raw = [mcnemar(y, preds[n], preds["base"]).pvalue for n in distinct]
    np.testing.assert_allclose([c.candidate(n).test.pvalue for n in distinct],
                               _holm_reference(np.array(raw)))
    assert any("base = wise_ft: identical predictions" in n for n in c.notes)
    assert c.friedman.compared == ("base = wise_ft", "soup", "ties = greedy", "dare")


def test_holm_consistent_intervals_agree_with_the_holm_verdict():
    rng = np.random.default_rng(8)
    checked = significant = 0
    for case in range(12):
        n = int(rng.integers(150, 400))
        y = rng.integers(0, 3, n)
        preds = {
            f"m{j}": np.eye(3)[np.where(rng.random(n) < acc, y, (y + 1) % 3)] * 0.8 + 0.2 / 3
            for j, acc in enumerate(rng.uniform(0.6, 0.8, 5))
        }
        alpha = float(rng.choice([0.05, 0.1]))
        c = compare_predictions(preds, y, alpha=alpha, interval="percentile", n_resamples=200,
                                random_state=case)
        raw = np.array([r.raw_pvalue for r in c.candidates[1:]])
        multipliers = []
        stopped = None
        for i, j in enumerate(np.argsort(raw, kind="stable")):
            if stopped is None and (4 - i) * raw[j] > alpha:
                stopped = 4 - i
            multipliers.append((j, 4 - i if stopped is None else stopped))
        for j, k in multipliers:
            row = c.candidates[1 + j]
            assert row.adjusted_difference.confidence_level == pytest.approx(1 - alpha / k)
            low, high = row.adjusted_difference.ci
            assert (low > 0 or high < 0) == (row.test.pvalue <= alpha) == row.significant
            checked += 1
            significant += row.significant
    assert checked == 48 and 0 < significant < 48


def test_enough_resamples_for_the_family_and_the_floor_stated():
    y, preds = _candidates(seed=5)
    six = {**preds, "e": preds["soup"][::-1].copy(), "f": preds["dare"] * 0.5 + 0.5 / 3}
    c = compare_predictions(six, y, n_resamples=200, test="permutation")
    # B = ceil(2 m 10 / alpha) - 1 = 1999 for m = 5: the smallest Holm p is 5 * 2 / 2000
    assert c.family_size == 5 and c.n_test_resamples == 1999
    assert c.p_floor == pytest.approx(5 * 2 / 2000) and c.p_floor <= 0.05 / 10
    assert not any("smallest Holm-adjusted" in n for n in c.notes)
    with pytest.warns(UserWarning, match="no candidate can be found significant"):
        few = compare_predictions(six, y, n_resamples=200, test="permutation",
                                  n_permutations=150)
    assert few.p_floor == pytest.approx(min(1.0, 5 * 2 / 151))
    assert any("pass n_permutations >= 1999" in n for n in few.notes)
    middle = compare_predictions(six, y, n_resamples=200, n_permutations=600)
    assert middle.p_floor == pytest.approx(5 * 2 / 601)
    assert any(n.startswith("the smallest Holm-adjusted p-value 600 resamples") for n in
               middle.notes)


def test_the_reference_rule_breaks_ties_by_the_tie_breaker_then_order():
    y, preds = _candidates(seed=6)
    scores = {"base": 0.7, "soup": 0.74, "ties": 0.74, "dare": 0.6}
    assert choose_reference(scores) == "soup"  # first among the tied
    assert choose_reference(scores, tie_breaker={"soup": 0.5, "ties": 0.4}) == "ties"
    assert choose_reference({"a": 0.3, "b": 0.2}, greater_is_better=False) == "b"
    c = compare_predictions(preds, y, n_resamples=100, reference_scores=scores,
                            reference_tie_breaker={"soup": 0.5, "ties": 0.4})
    assert c.reference == "ties" and "tie-breaker" in c.reference_rule
    with pytest.raises(DataError, match="tie_breaker: no value for ties"):
        choose_reference(scores, tie_breaker={"soup": 0.5})
    with pytest.raises(ConfigError, match="reference_scores: 'nope' is not a candidate"):
        compare_predictions(preds, y, reference_scores={"nope": 1.0})


def test_the_leader_is_named_as_chosen_on_these_samples_with_its_significance():
    y, preds = _candidates(seed=7)
    c = compare_predictions(preds, y, reference="base", n_resamples=300)
    assert c.leader == ("ties",)
    note = c.notes[-1]
    assert note.startswith("highest accuracy on these 600 samples: ties")
    assert "picked on the samples it is scored on" in note
    assert "the edge of ties over the reference base is significant" in note
    nll = compare_predictions(preds, y, metric="nll", n_resamples=300)
    assert nll.notes[-1].startswith("lowest nll on these 600 samples")


def test_not_significant_edge_is_said_so():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, 200)
    a = np.eye(2)[np.where(rng.random(200) < 0.70, y, 1 - y)]
    b = a.copy()
    b[:3] = np.eye(2)[y[:3]]  # three more samples right: an edge far from significant
    c = compare_predictions({"a": a, "b": b}, y, n_resamples=300)
    assert c.leader == ("b",) and not c.candidates[1].significant
    assert "the edge of b over the reference a is not significant" in c.notes[-1]


def test_groups_reach_every_resampling_and_mcnemar_refuses_them():
    y, preds = _candidates(seed=8)
    groups = np.arange(len(y)) // 4
    c = compare_predictions(preds, y, groups=groups, n_resamples=200, test="permutation")
    assert c.n_groups == 150
    row = c.candidates[1]
    assert "cluster, 150 groups" in row.estimate.method
    assert "cluster, 150 groups" in row.difference.method
    assert "whole groups, 150" in row.test.method
    with pytest.raises(ConfigError, match="McNemar's test treats samples as independent"):
        compare_predictions(preds, y, groups=groups, test="mcnemar")
