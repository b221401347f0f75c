"""Result objects: frozen, printable as one line naming the method and what was compared."""

import dataclasses

import numpy as np
import pytest

from modelfuse.evaluation import (
    TestResult,
    cochrans_q,
    friedman_test,
    mcnemar_from_counts,
    paired_5x2cv,
)
from modelfuse.evaluation.results import IntervalResult


def test_results_are_frozen_and_print_on_one_line():
    results = [
        TestResult(statistic=1.5, pvalue=0.2, method="t", compared=("a", "b"), df=3),
        mcnemar_from_counts(4, 9, names=("x", "y")),
        cochrans_q(np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1]]), names=["p", "q", "r"]),
        paired_5x2cv(np.arange(10.0).reshape(5, 2) / 100),
        friedman_test(np.array([[1.0, 2, 3], [1, 3, 2], [2, 1, 3]]), names=["u", "v", "w"]),
        IntervalResult(statistic=0.8, ci=(0.7, 0.9), method="bootstrap BCa",
                       compared=("accuracy", "m")),
    ]
    for r in results:
        text = str(r)
        assert "\n" not in text and text
        with pytest.raises(dataclasses.FrozenInstanceError):
            r.method = "changed"
    assert "[x vs y]" in str(results[1]) and "p=" in str(results[1])
    assert "95% CI [0.7, 0.9]" in str(results[-1])
    assert "u=" in str(results[4]) and "CD=" in str(results[4])


def test_every_result_exposes_statistic_pvalue_ci_method():
    r = mcnemar_from_counts(3, 8)
    assert (r.statistic, r.ci, r.method) == (3.0, None, "McNemar (exact binomial)")
    assert 0 < r.pvalue < 1


def test_arrays_inside_results_are_read_only():
    r = paired_5x2cv(np.arange(10.0).reshape(5, 2) / 100)
    with pytest.raises(ValueError, match="read-only"):
        r.differences[0, 0] = 1.0
    i = IntervalResult(statistic=0.8, ci=(0.7, 0.9), method="m",
                       bootstrap_distribution=np.array([0.7, 0.9]))
    with pytest.raises(ValueError, match="read-only"):
        i.bootstrap_distribution[0] = 0.0
