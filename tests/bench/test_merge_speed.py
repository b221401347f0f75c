"""The merge benchmark's confidence interval of a median, against the binomial formula
and the textbook table (Conover, Practical Nonparametric Statistics, table A3)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from scipy.stats import binom

_PATH = Path(__file__).resolve().parents[2] / "bench" / "merge_speed.py"


@pytest.fixture(scope="module")
def median_interval():
    spec = importlib.util.spec_from_file_location("merge_speed", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.median_interval


@pytest.mark.parametrize(("n", "ranks"), [(6, (1, 6)), (9, (2, 8)), (10, (2, 9)), (20, (6, 15))])
def test_order_statistics_are_the_textbook_ones(median_interval, n, ranks):
    values = [10.0 * i for i in range(1, n + 1)]  # x_(i) = 10 i
    low, high = median_interval(values[::-1])  # any order
    assert (low / 10, high / 10) == ranks


@pytest.mark.parametrize("n", range(1, 31))
def test_coverage_is_the_tightest_at_95_percent(median_interval, n):
    """x_(k), x_(n+1-k) cover the median with probability 1 - 2 P(B <= k - 1): at least 0.95,
    and one rank further in would fall below 0.95."""
    interval = median_interval(list(range(1, n + 1)))
    if interval is None:
        assert 1 - 2 * binom.cdf(0, n, 0.5) < 0.95
        return
    k = int(interval[0])
    assert interval[1] == n + 1 - k
    assert 1 - 2 * binom.cdf(k - 1, n, 0.5) >= 0.95
    assert k + 1 > n // 2 or 1 - 2 * binom.cdf(k, n, 0.5) < 0.95
