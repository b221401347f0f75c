"""The demo's statistics as the report states them: the shifted split, one row per model, the
paired bootstrap with Holm-consistent intervals, whole-image resampling for the multi-task
views, the sentences computed from the verdicts, the cross-seed summary and ``--seeds``."""

from __future__ import annotations

import numpy as np
import pytest

from modelfuse.cli import main
from modelfuse.demo.data import shifted
from modelfuse.demo.evaluate import (
    Entry,
    MetricRow,
    compare_split,
    merge_duplicates,
    same_predictions,
)
from modelfuse.demo.report import headlines, helps_sentences, highest_sentence
from modelfuse.demo.run import check_seeds
from modelfuse.demo.seeds import REFERENCE, SeedResult, seed_sentences, summarize_seeds
from modelfuse.errors import ConfigError


def test_the_shift_rotates_each_image_about_its_centre_and_is_fixed_by_the_seed():
    rng = np.random.default_rng(0)
    x = rng.random((20, 64)).astype(np.float32)
    before = x.copy()
    # at exactly 90 degrees either way the rotation is numpy's rot90 one way or the other
    turned = shifted(x, 5, low=90.0, high=90.0).reshape(-1, 8, 8)
    images = x.reshape(-1, 8, 8)
    for image, out in zip(images, turned):
        ways = [np.rot90(image, k) for k in (1, -1)]
        assert any(np.allclose(out, w, atol=1e-5) for w in ways)
    np.testing.assert_array_equal(x, before)  # the input is not modified
    a, b, c = shifted(x, 1), shifted(x, 1), shifted(x, 2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    # a tilt of 15 to 30 degrees moves the image: never the identity
    assert all(not np.allclose(s, o) for s, o in zip(a, x))


def _entry(name: str, p: np.ndarray, family: str = "merge") -> Entry:
    lp = np.log(p)
    return Entry(name, family, 1, f"built as {name}", lp, lp, lp)  # type: ignore[arg-type]


def test_identical_models_share_one_row_and_count_once():
    p = np.array([[0.7, 0.3], [0.2, 0.8]])
    a = _entry("ft-1", p, "individual")
    copy = Entry("WiSE-FT", "merge", 1, "alpha 1", a.val + 1e-13, a.test, a.shift)
    other = _entry("soup", np.array([[0.6, 0.4], [0.3, 0.7]]))
    merged, renamed = merge_duplicates([a, other, copy])
    assert [e.name for e in merged] == ["ft-1 = WiSE-FT", "soup"]
    assert merged[0].family == "individual"
    assert "WiSE-FT (alpha 1) has identical predictions" in merged[0].details
    assert renamed == {"ft-1": "ft-1 = WiSE-FT", "WiSE-FT": "ft-1 = WiSE-FT", "soup": "soup"}
    # equal on validation and test but not on the shifted split: two models
    differs = Entry("x", "merge", 1, "", a.val, a.test, np.log(np.array([[0.5, 0.5], [0.5, 0.5]])))
    assert len(merge_duplicates([a, differs])[0]) == 2
    assert same_predictions(a.val, a.val + 1e-13)
    assert not same_predictions(a.val, np.log(np.array([[0.7 + 1e-6, 0.3 - 1e-6], [0.2, 0.8]])))


def _predictions(y: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    right = rng.random(len(y)) < accuracy
    guess = np.where(right, y, (y + 1) % 3)
    p = np.full((len(y), 3), 0.1)
    p[np.arange(len(y)), guess] = 0.8
    return p


def test_the_interval_of_the_difference_agrees_with_the_holm_verdict():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    accs = {"ref": 0.75, "same": 0.75, "better": 0.9, "slightly": 0.78, "worse": 0.6}
    entries = [_entry(n, _predictions(y, a, rng)) for n, a in accs.items()]
    result = compare_split(entries, y, "ref", metrics=("accuracy",), n_resamples=500, seed=0)
    assert result.family_size == 4
    assert result.n_test_resamples >= 2 * 4 * 10 / 0.05 - 1  # floor at most alpha / 10
    assert result.p_floor is not None and result.p_floor <= 0.005
    by_name = {r.name: r for r in result.rows}
    for name, entry in zip(accs, entries):
        row = by_name[name]
        hand = float(np.mean(entry.test.argmax(1) == y))  # accuracy written out
        assert row.metrics["accuracy"][0] == pytest.approx(hand)
        if name == "ref":
            assert row.differences == {}
            continue
        diff, (low, high), p = row.differences["accuracy"]
        ref_hand = float(np.mean(entries[0].test.argmax(1) == y))
        assert diff == pytest.approx(hand - ref_hand)
        assert row.adjusted["accuracy"]
        assert (low > 0 or high < 0) == (p <= 0.05)
    assert by_name["better"].differences["accuracy"][2] <= 0.05
    assert by_name["worse"].differences["accuracy"][2] <= 0.05


def test_views_of_one_image_are_resampled_together():
    """Four identical views of each image carry the information of one: resampling whole
    images gives the single-view interval (normal closed form with n images), resampling
    views as independent gives one half as wide."""
    rng = np.random.default_rng(2)
    n = 300
    y = rng.integers(0, 3, n)
    base = _predictions(y, 0.7, rng)
    other = _predictions(y, 0.8, rng)
    views = 4
    labels = np.tile(y, views)
    entries = [_entry("a", np.tile(base, (views, 1))), _entry("b", np.tile(other, (views, 1)))]
    groups = np.tile(np.arange(n), views)
    kwargs = dict(metrics=("accuracy",), n_resamples=2000, seed=0, interval="percentile")
    grouped = compare_split(entries, labels, "a", groups=groups, **kwargs).rows[0]
    flat = compare_split(entries, labels, "a", **kwargs).rows[0]
    p = grouped.metrics["accuracy"][0]
    closed_form = 2 * 1.96 * np.sqrt(p * (1 - p) / n)
    width = np.diff(grouped.metrics["accuracy"][1])[0]
    flat_width = np.diff(flat.metrics["accuracy"][1])[0]
    assert width == pytest.approx(closed_form, rel=0.15)
    assert flat_width == pytest.approx(closed_form / 2, rel=0.15)


def _row(name: str, acc: float, diff: float | None = None, p: float = 1.0, family: str = "merge"):
    differences = {} if diff is None else {"accuracy": (diff, (diff - 0.01, diff + 0.01), p)}
    return MetricRow(
        name, family, 1, "", {"accuracy": (acc, (acc - 0.02, acc + 0.02))}, differences
    )


def test_where_fusion_helps_is_read_off_both_verdicts():
    ref = _row("ft-1", 0.90, family="individual")
    test = [
        ref,
        _row("both", 0.95, 0.05, 0.001),
        _row("in", 0.95, 0.05, 0.001),
        _row("out", 0.90, 0.00, 1.0),
        _row("mixed", 0.95, 0.05, 0.001),
        _row("flat", 0.91, 0.01, 0.5),
        _row("ft-2", 0.80, -0.10, 0.001, family="individual"),
    ]
    shift = [
        _row("ft-1", 0.50, family="individual"),
        _row("both", 0.60, 0.10, 0.01),
        _row("in", 0.49, -0.01, 0.6),
        _row("out", 0.60, 0.10, 0.01),
        _row("mixed", 0.40, -0.10, 0.01),
        _row("flat", 0.50, 0.00, 1.0),
        _row("ft-2", 0.50, 0.0, 1.0, family="individual"),
    ]
    said = helps_sentences(test, shift, "ft-1")
    assert said == [
        "Helps on both test splits: both (test +0.0500, shifted +0.1000).",
        "Helps only in distribution (test split): in (test +0.0500, shifted -0.0100).",
        "Helps only under the shift: out (test +0.0000, shifted +0.1000).",
        "Significantly worse on at least one split (and better on neither): mixed "
        "(test +0.0500, shifted -0.1000).",
        "No significant difference on either split: flat (test +0.0100, shifted +0.0000).",
    ]


def test_the_highest_accuracy_sentence_says_it_was_picked_on_test_and_whether_it_is_significant():
    ref = _row("ft-1", 0.90, family="individual")
    lucky = _row("soup", 0.92, 0.02, 0.30)
    assert highest_sentence([ref, lucky], "ft-1") == (
        "Highest test accuracy: soup (0.9200, 1 network per prediction), picked on the test "
        "split it is scored on; its edge over ft-1 (+0.0200) is not significant (Holm-adjusted "
        "p = 0.3000 > 0.05), so the test split does not show that soup is better than ft-1."
    )
    real = _row("soup", 0.95, 0.05, 0.004)
    assert highest_sentence([ref, real], "ft-1").endswith(
        "its edge over ft-1 (+0.0500) is significant (Holm-adjusted p = 0.0040 <= 0.05)."
    )
    assert highest_sentence([ref, _row("soup", 0.8, -0.1, 0.001)], "ft-1").endswith(
        "it is the reference itself."
    )
    lines = headlines([ref, real], "ft-1", "Soup scenario", rule="the best")
    assert lines[0] == (
        "Soup scenario: the reference is ft-1, the best; its test accuracy is 0.9000 "
        "[0.8800, 0.9200]."
    )
    assert lines[1] == (
        "Significantly better than ft-1 in test accuracy (Holm-adjusted p <= 0.05): soup (+0.0500)."
    )


def _seed(seed: int, ref_acc: float, soup_acc: float, p: float, same: bool = False) -> SeedResult:
    ref = _row("ft-1", ref_acc, family="individual")
    if same:
        ref = _row("ft-1 = soup", ref_acc, family="individual")
        rows = [ref]
        renamed = {"ft-1": "ft-1 = soup", "soup": "ft-1 = soup"}
    else:
        rows = [ref, _row("soup", soup_acc, soup_acc - ref_acc, p)]
        renamed = {"ft-1": "ft-1", "soup": "soup"}
    return SeedResult(seed, ref.name, {"test": rows, "shift": rows}, renamed)


def test_the_cross_seed_summary_is_mean_and_sample_sd_of_each_seed():
    results = [
        _seed(0, 0.90, 0.95, 0.001),
        _seed(1, 0.92, 0.93, 0.4),
        _seed(2, 0.91, 0.91, 1.0, same=True),
    ]
    summaries = summarize_seeds(results, ["soup"])
    by_key = {(s.method, s.split): s for s in summaries}
    soup = by_key[("soup", "test")]
    assert soup.accuracies == (0.95, 0.93, 0.91)
    assert soup.mean == pytest.approx((0.95 + 0.93 + 0.91) / 3)
    mean = (0.95 + 0.93 + 0.91) / 3
    sd = np.sqrt(sum((a - mean) ** 2 for a in (0.95, 0.93, 0.91)) / 2)
    assert soup.spread == pytest.approx(sd)
    assert soup.differences == pytest.approx((0.05, 0.01, 0.0))
    assert (soup.better, soup.worse, soup.same_as_reference) == (1, 0, 1)
    ref = by_key[(REFERENCE, "test")]
    assert ref.accuracies == (0.90, 0.92, 0.91) and ref.differences == (0.0, 0.0, 0.0)
    lines = seed_sentences(summaries, 3)
    assert lines[0] == (
        "On the test split, across 3 seeds: significantly better than the reference on every "
        "seed: none. Better on some seeds only: soup (1 of 3 seeds, mean difference +0.0200). "
        "Worse on at least one seed: none."
    )


def test_seeds_are_checked():
    assert check_seeds([4, 0]) == (4, 0)
    for bad, match in (
        ([], "at least one seed"),
        ([1, 1], "seed 1 is given twice"),
        ([-1], "out of range"),
        ([2**32], "out of range"),
        (list(range(11)), "at most 10"),
        ([1.5], "expected integers"),
    ):
        with pytest.raises(ConfigError, match=match):
            check_seeds(bad)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--seeds", "0,0"], "--seeds: seed 0 is given twice"),
        (["--seeds", "a,b"], "--seeds: expected non-negative integers separated by commas"),
        (["--seeds", ""], "--seeds: expected non-negative integers"),
        (["--seeds", "0,-1"], "--seeds: expected non-negative integers"),
        (["--seeds", "99999999999"], "--seeds: expected non-negative integers"),
        (["--seeds", ",".join(map(str, range(12)))], "--seeds: 12 seeds; at most 10"),
        (["--seed", "1", "--seeds", "0,1"], "--seed and --seeds: give one of them"),
    ],
)
def test_bad_seeds_on_the_command_line_are_refused_before_any_work(
    tmp_path, capsys, args, expected
):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelfuse: error: ") and expected in lines[0]
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written
