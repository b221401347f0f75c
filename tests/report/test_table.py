"""Tables: Markdown and text layouts, escaping, and the comparison table's columns."""

import numpy as np
import pytest

from modelfuse.errors import ConfigError
from modelfuse.evaluation import compare_predictions, friedman_test
from modelfuse.report import (
    comparison_rows,
    comparison_table,
    format_number,
    format_pvalue,
    format_table,
    friedman_summary,
)


def test_markdown_table_layout():
    text = format_table(["model", "score"], [["a|b", 0.123456], ["c", None]])
    assert text.splitlines() == [
        "| model |  score |",
        "| :---- | -----: |",
        "| a\\|b  | 0.1235 |",
        "| c     |        |",
    ]


def test_text_table_layout():
    text = format_table(["name", "x"], [["long name", 1.0], ["b", 22.5]], style="text")
    assert text.splitlines() == [
        "name          x",
        "---------  ----",
        "long name     1",
        "b          22.5",
    ]


def test_mismatched_rows_and_unknown_style_are_rejected():
    with pytest.raises(ConfigError, match="rows\\[0\\]"):
        format_table(["a", "b"], [[1]])
    with pytest.raises(ConfigError, match="markdown, text"):
        format_table(["a"], [[1]], style="html")


def test_comparison_table_columns_and_values():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    good = np.eye(2)[np.where(rng.random(300) < 0.9, y, 1 - y)]
    bad = np.eye(2)[np.where(rng.random(300) < 0.6, y, 1 - y)]
    c = compare_predictions({"ref": bad, "new": good}, y, n_resamples=300)
    headers, rows = comparison_rows(c)
    assert headers == ["model", "accuracy", "95% CI", "diff vs ref", "Holm-consistent CI of diff",
                       "p (Holm)", "Holm verdict (alpha 0.05)"]
    assert rows[0][0] == "ref (reference)" and rows[0][3:] == ["", "", "", ""]
    new = c.candidates[1]
    assert rows[1][1] == f"{new.estimate.statistic:.4f}"
    assert rows[1][2] == f"[{new.estimate.ci[0]:.4f}, {new.estimate.ci[1]:.4f}]"
    assert rows[1][3] == f"{new.difference.statistic:+.4f}"
    held = new.adjusted_difference.ci
    assert rows[1][4] == f"[{held[0]:+.4f}, {held[1]:+.4f}]"
    assert rows[1][5] == ("<0.0001" if new.test.pvalue < 1e-4 else f"{new.test.pvalue:.4f}")
    assert rows[1][6] == "better"
    text = comparison_table(c, style="text")
    assert "ref (reference)" in text and "p (Holm)" in text
    # another test: the unadjusted paired interval, labelled so
    c = compare_predictions({"ref": bad, "new": good}, y, n_resamples=300, test="mcnemar")
    headers, rows = comparison_rows(c)
    assert headers[4] == "95% CI of diff (unadjusted)"
    ci = c.candidates[1].difference.ci
    assert rows[1][4] == f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def test_identical_candidates_share_one_row():
    y = np.array([0, 1] * 50)
    p = np.eye(2)[y]
    c = compare_predictions({"a": p, "b": p[::-1], "wise_ft": p.copy()}, y, n_resamples=100)
    _, rows = comparison_rows(c)
    assert [r[0] for r in rows] == ["a = wise_ft (reference)", "b"]


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        (0.768, "metric", "0.7680"),
        (12.0, "metric", "12.0000"),
        (0.072, "difference", "+0.0720"),
        (-0.5, "difference", "-0.5000"),
        (0.0, "difference", "+0.0000"),
        (0.00204, "pvalue", "0.0020"),
        (0.0001, "pvalue", "0.0001"),
        (0.0000999, "pvalue", "<0.0001"),
        (0.0, "pvalue", "<0.0001"),
        (1.0, "pvalue", "1.0000"),
        (1.049, "rank", "1.05"),
        (19.155, "statistic", "19.16"),
        (None, "metric", ""),
        (float("nan"), "metric", "nan"),
        (float("-inf"), "difference", "-inf"),
    ],
)
def test_one_number_format_per_column_kind(value, kind, expected):
    assert format_number(value, kind) == expected


def test_every_cell_of_a_column_has_the_same_decimals():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 500)
    preds = {
        f"m{j}": np.eye(3)[np.where(rng.random(500) < acc, y, (y + 1) % 3)] * 0.9 + 0.1 / 3
        for j, acc in enumerate([0.5, 0.52, 0.9, 1.0])
    }
    _, rows = comparison_rows(compare_predictions(preds, y, metric="nll", n_resamples=200))
    for column in (1, 3, 5):
        cells = [r[column] for r in rows if r[column]]
        decimals = {len(c.split(".")[1]) for c in cells if c != "<0.0001"}
        assert decimals == {4}, cells
    assert all(r[3][0] in "+-" for r in rows[1:])
    assert "0.0000" not in [r[5] for r in rows]


def test_number_kinds_are_checked_and_p_values_read_as_sentences():
    with pytest.raises(ConfigError, match="metric, difference, pvalue, rank, statistic"):
        format_number(0.5, "percent")
    assert format_pvalue(0.04) == "p = 0.0400"
    assert format_pvalue(1e-12) == "p < 0.0001"


def test_friedman_summary_hand_worked():
    # 4 blocks, 3 candidates always ranked c < a < b: chi2 = 12 N / (k (k+1)) sum R^2 - 3 N (k+1)
    scores = np.array([[0.8, 0.7, 0.9]] * 4)
    f = friedman_test(scores, names=["a", "b", "c"])
    n, k = 4, 3
    chi2 = 12 * n / (k * (k + 1)) * (2.0**2 + 3.0**2 + 1.0**2) - 3 * n * (k + 1)
    assert chi2 == pytest.approx(8.0)
    first, second = friedman_summary(f).splitlines()
    assert first == f"Friedman test over 4 blocks: chi2 = 8.00 on 2 df, p = {np.exp(-4):.4f}"
    assert second.startswith("mean ranks (1 = best): c 1.00, a 2.00, b 3.00;")
