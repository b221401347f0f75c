"""Tables: Markdown and text layouts, escaping, and the comparison table's columns."""

import numpy as np
import pytest

from modelfuse.errors import ConfigError
from modelfuse.evaluation import compare_predictions
from modelfuse.report import comparison_rows, comparison_table, format_table


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
    assert headers == ["model", "accuracy", "95% CI", "diff vs ref", "95% CI of diff",
                       "p (Holm)"]
    assert rows[0][0] == "ref (reference)" and rows[0][3:] == ["", "", ""]
    new = c.candidates[1]
    assert rows[1][1] == f"{new.estimate.statistic:.4g}"
    assert rows[1][3] == f"{new.difference.statistic:+.4g}"
    assert rows[1][4] == f"[{new.difference.ci[0]:.4g}, {new.difference.ci[1]:.4g}]"
    assert rows[1][5] == f"{new.test.pvalue:.4f}"
    text = comparison_table(c, style="text")
    assert "ref (reference)" in text and "p (Holm)" in text
