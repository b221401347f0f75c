"""Intervals and p-values from the same replicates never disagree; BCa falls back where unstable."""

import numpy as np
import pytest
from scipy.special import ndtr, ndtri

from modelfuse.evaluation import bootstrap_metric, interval_at_level, paired_bootstrap
from modelfuse.evaluation.intervals import BCA_MIN_RESAMPLES, Inference, min_resamples
from modelfuse.evaluation.results import IntervalResult


def _excludes_zero(ci):
    return bool(ci[0] > 0 or ci[1] < 0)


def _alpha(level):
    return 1 - level  # as a caller compares a p-value with a level


def _pair(rng, n, acc_a, acc_b, k=3):
    y = rng.integers(0, k, n)
    soft = lambda acc: (  # noqa: E731
        np.eye(k)[np.where(rng.random(n) < acc, y, (y + 1) % k)] * 0.7
        + rng.dirichlet(np.ones(k), n) * 0.3
    )
    return soft(acc_a), soft(acc_b), y


def test_hand_worked_percentile_pvalue_and_interval():
    # 39 replicates: -2, -1, 0 and 36 positive ones. L = #(d <= 0) = 3, R = #(d >= 0) = 37,
    # p = 2 (min(L, R) + 1) / (B + 1) = 2 * 4 / 40 = 0.2.
    d = np.concatenate([[-2.0, -1.0, 0.0], np.arange(1.0, 37.0)])
    inference = Inference(np.sort(d), "percentile")
    assert inference.pvalue() == pytest.approx(0.2)
    # at level 0.79, j = 4 (2 * 4 / 40 <= 0.21): [d_(4), d_(36)] = [1, 33] excludes 0
    assert inference.interval(0.79) == (1.0, 33.0)
    # 1 - 0.8 is 0.19999999999999996 in floating point, just below p = 0.2: j = 3 and the
    # interval keeps 0, as the p-value says
    assert inference.interval(0.8) == (0.0, 34.0)
    # above level 0.8, j = 3: [d_(3), d_(37)] = [0, 34] holds 0 at its edge
    assert inference.interval(0.81) == (0.0, 34.0)
    assert inference.p_floor == pytest.approx(2 / 40)


def test_paired_percentile_pvalue_is_the_written_out_formula():
    rng = np.random.default_rng(5)
    a, b, y = _pair(rng, 300, 0.75, 0.7)
    r = paired_bootstrap(a, b, y, method="percentile", n_resamples=999, random_state=1)
    d = r.bootstrap_distribution
    expected = 2 * (min(np.sum(d <= 0), np.sum(d >= 0)) + 1) / (len(d) + 1)
    assert r.pvalue == pytest.approx(min(1.0, expected))
    assert r.p_floor == pytest.approx(2 / 1000)


def test_bca_pvalue_is_the_written_out_inversion():
    # p = 2 Phi(c / (1 + a c) - z0) with c = Phi^-1((L + 1) / (B + 1)) - z0 (lower tail)
    rng = np.random.default_rng(2)
    d = np.sort(rng.normal(1.5, 1.0, 1999))
    z0, a = 0.1, 0.03
    inference = Inference(d, "bca", z0, a)
    lower = np.sum(d <= 0)
    c = ndtri((lower + 1) / 2000) - z0
    expected = 2 * ndtr(c / (1 + a * c) - z0)
    assert inference.pvalue() == pytest.approx(expected, rel=1e-12)
    # just above that alpha the interval excludes 0, just below it holds 0
    assert _excludes_zero(inference.interval(1 - expected * 1.001))
    assert not _excludes_zero(inference.interval(1 - expected * 0.999))


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_pvalue_at_most_alpha_exactly_when_the_interval_excludes_zero(method):
    # many random pairs, metrics and levels: each result's own p-value and interval agree
    rng = np.random.default_rng(11)
    disagreements, rejections = [], 0
    for case in range(60):
        n = int(rng.integers(40, 400))
        a, b, y = _pair(rng, n, rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9))
        level = float(rng.uniform(0.6, 0.99))
        metric = ("accuracy", "nll", "brier")[case % 3]
        r = paired_bootstrap(a, b, y, metric=metric, method=method, confidence_level=level,
                             n_resamples=1000, random_state=case)
        rejections += r.pvalue <= _alpha(level)
        if (r.pvalue <= _alpha(level)) != _excludes_zero(r.ci):
            disagreements.append((case, r.pvalue, level, r.ci))
        # the same replicates read at other levels keep agreeing with the same p-value
        for other in rng.uniform(0.5, 0.995, 8):
            ci = interval_at_level(r, float(other)).ci
            if (r.pvalue <= _alpha(other)) != _excludes_zero(ci):
                disagreements.append((case, r.pvalue, other, ci))
    assert disagreements == []
    assert 5 < rejections < 55  # both outcomes were exercised


def test_interval_at_level_reads_the_same_replicates():
    rng = np.random.default_rng(3)
    a, b, y = _pair(rng, 200, 0.8, 0.7)
    r = paired_bootstrap(a, b, y, method="percentile", n_resamples=1999, random_state=0)
    wider = interval_at_level(r, 0.99)
    assert wider.ci[0] <= r.ci[0] and wider.ci[1] >= r.ci[1]
    ordered = np.sort(r.bootstrap_distribution)
    assert wider.ci == (ordered[9], ordered[1999 - 10])  # j = floor(2000 * 0.005) = 10
    assert wider.pvalue == r.pvalue and wider.confidence_level == 0.99


def test_min_resamples_is_the_smallest_count_with_finite_ends():
    for level in (0.8, 0.9, 0.95, 0.99, 0.999):
        n = min_resamples(level)
        assert np.isfinite(Inference(np.arange(float(n)), "percentile").interval(level)).all()
        assert not np.isfinite(Inference(np.arange(n - 1.0), "percentile").interval(level)).all()


def test_bca_is_kept_where_stable():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    probs = np.eye(2)[np.where(rng.random(500) < 0.8, y, 1 - y)]
    r = bootstrap_metric(probs, y, n_resamples=2000, random_state=0)
    assert r.method_used == "bca" and r.fallback is None
    assert r.method == "bootstrap BCa"
    assert r.ci[0] < r.statistic < r.ci[1]
    assert r.acceleration != 0.0


def test_bca_falls_back_when_the_estimate_sits_outside_its_interval():
    # the ECE of a calibrated model is biased upwards: nearly every resample exceeds it,
    # and the corrected levels leave the replicates (or the estimate leaves the interval)
    rng = np.random.default_rng(0)
    p1 = rng.uniform(0.05, 0.95, 300)
    y = (rng.random(300) < p1).astype(int)
    r = bootstrap_metric(np.stack([1 - p1, p1], 1), y, metric="ece", n_resamples=2000,
                         random_state=0)
    assert r.method_used == "percentile"
    assert r.method == "bootstrap percentile (BCa unstable)"
    assert r.fallback.startswith("percentile, as BCa is unstable here")


def test_bca_falls_back_on_a_degenerate_statistic_and_on_few_resamples():
    y = np.array([0, 1] * 100)
    perfect = np.eye(2)[y]
    r = bootstrap_metric(perfect, y, n_resamples=1000, random_state=0)
    assert r.method_used == "percentile" and "jackknife value is equal" in r.fallback
    assert r.ci == (1.0, 1.0)
    rng = np.random.default_rng(1)
    noisy = np.eye(2)[np.where(rng.random(200) < 0.8, y, 1 - y)]
    few = bootstrap_metric(noisy, y, n_resamples=BCA_MIN_RESAMPLES - 1, random_state=0)
    assert few.method_used == "percentile" and f"at least {BCA_MIN_RESAMPLES}" in few.fallback


def test_a_hand_built_result_can_be_read_at_another_level():
    d = np.arange(1.0, 200.0)
    r = IntervalResult(statistic=50.0, ci=(0.0, 0.0), method="x", bootstrap_distribution=d)
    assert interval_at_level(r, 0.95).ci == (5.0, 195.0)  # j = floor(200 * 0.05 / 2) = 5
