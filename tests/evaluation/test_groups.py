"""Grouped samples: the cluster bootstrap and whole-group sign flips.

References: one sample per group is the ungrouped procedure; the cluster
bootstrap's spread is the linearised (ratio-estimator) formula; an exact
enumeration written out here; and simulations of size and coverage under the
null with strongly correlated samples within groups.
"""

from itertools import product

import numpy as np
import pytest
from scipy.stats import ks_2samp

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation import (
    bootstrap_metric,
    group_codes,
    metric_permutation_test,
    paired_bootstrap,
    paired_permutation_test,
)
from modelfuse.evaluation.metrics import accuracy


def _onehot(rng, y, acc, k=2):
    return np.eye(k)[np.where(rng.random(len(y)) < acc, y, (y + 1) % k)]


def test_one_sample_per_group_flips_like_the_ungrouped_test():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.2, 1, 80), rng.normal(0, 1, 80)
    plain = paired_permutation_test(x, y, n_resamples=999, random_state=4)
    grouped = paired_permutation_test(x, y, n_resamples=999, random_state=4, groups=np.arange(80))
    assert grouped.pvalue == plain.pvalue and grouped.statistic == plain.statistic
    assert "whole groups, 80" in grouped.method


@pytest.mark.parametrize("metric", ["accuracy", "auroc", "ece"])
def test_one_sample_per_group_resamples_like_the_ungrouped_bootstrap(metric):
    rng = np.random.default_rng(1)
    n = 120
    y = rng.integers(0, 2, n)
    p = np.clip(_onehot(rng, y, 0.75) * 0.6 + rng.random((n, 2)) * 0.4, 1e-3, None)
    p /= p.sum(1, keepdims=True)
    b = 600 if metric != "ece" else 300
    kw = dict(metric=metric, method="percentile", n_resamples=b, stratify=False)
    plain = bootstrap_metric(p, y, random_state=0, **kw)
    grouped = bootstrap_metric(p, y, random_state=1, groups=np.arange(n)[::-1], **kw)
    assert grouped.n_groups == n and "cluster, 120 groups" in grouped.method
    assert ks_2samp(plain.bootstrap_distribution, grouped.bootstrap_distribution).pvalue > 0.01
    sd = plain.bootstrap_distribution.std()
    assert grouped.bootstrap_distribution.std() == pytest.approx(sd, rel=0.15)


def test_one_sample_per_group_jackknife_gives_the_same_acceleration():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    a, b = _onehot(rng, y, 0.8, 3) * 0.9 + 0.1 / 3, _onehot(rng, y, 0.7, 3) * 0.9 + 0.1 / 3
    kw = dict(metric="nll", n_resamples=1000, random_state=0)
    plain = paired_bootstrap(a, b, y, **kw)
    grouped = paired_bootstrap(a, b, y, groups=np.arange(300), **kw)
    assert grouped.acceleration == pytest.approx(plain.acceleration, rel=1e-9, abs=1e-15)


def test_cluster_bootstrap_spread_is_the_linearised_ratio_formula():
    # accuracy = sum_g T_g / sum_g m_g over G groups of unequal size m_g; resampling groups,
    # its variance is about sum_g (T_g - theta m_g)^2 / n^2 (the delta method for a ratio)
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 9, 150)
    groups = np.repeat(np.arange(150), sizes)
    n = len(groups)
    ability = rng.choice([0.05, 0.95], 150)[groups]  # correctness correlated within a group
    y = rng.integers(0, 2, n)
    p = np.eye(2)[np.where(rng.random(n) < ability, y, 1 - y)]
    r = bootstrap_metric(p, y, groups=groups, method="percentile", n_resamples=4000,
                         random_state=0)
    correct = (p.argmax(1) == y).astype(float)
    theta = correct.mean()
    totals = np.bincount(groups, weights=correct)
    expected_sd = np.sqrt(np.sum((totals - theta * sizes) ** 2)) / n
    assert r.bootstrap_distribution.std() == pytest.approx(expected_sd, rel=0.08)
    plain_sd = np.sqrt(theta * (1 - theta) / n)
    assert expected_sd > 1.3 * plain_sd  # the correlation matters, so the test can fail


def test_exact_whole_group_swaps_match_an_enumeration_written_out():
    rng = np.random.default_rng(4)
    groups = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4, 4])
    y = rng.integers(0, 2, 10)
    a, b = _onehot(rng, y, 0.9), _onehot(rng, y, 0.5)
    observed = accuracy(a, y) - accuracy(b, y)
    null = []
    for pattern in product([False, True], repeat=5):
        swap = np.array(pattern)[groups]
        pa = np.where(swap[:, None], b, a)
        pb = np.where(swap[:, None], a, b)
        null.append(accuracy(pa, y) - accuracy(pb, y))
    null = np.array(null)
    expected = min(1.0, 2 * min(np.mean(null >= observed - 1e-12),
                                np.mean(null <= observed + 1e-12)))
    for metric in ("accuracy", "ece"):  # the sums path and the stacked-predictions path
        r = metric_permutation_test(a, b, y, metric=metric, groups=groups)
        assert "(exact)" in r.method and r.p_floor == pytest.approx(2 / 32)
    r = metric_permutation_test(a, b, y, groups=groups)
    assert r.pvalue == pytest.approx(expected)


def test_paired_permutation_exact_for_few_groups_matches_the_enumeration():
    x = np.array([1.0, 2.0, 0.5, 3.0, 1.5, 2.5])
    y = np.array([0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    groups = np.array([7, 7, 3, 3, 9, 9])
    sums = np.bincount(group_codes(groups, 6), weights=x - y)
    null = np.array([np.dot(s, sums) for s in product([1, -1], repeat=3)]) / 6
    obs = (x - y).mean()
    expected = min(1.0, 2 * min(np.mean(null >= obs - 1e-12), np.mean(null <= obs + 1e-12)))
    r = paired_permutation_test(x, y, groups=groups)
    assert r.pvalue == pytest.approx(expected) and r.p_floor == pytest.approx(2 / 8)


def _correlated_null(rng, n_groups, size):
    """Two exchangeable models whose per-sample correctness shares one coin per group."""
    groups = np.repeat(np.arange(n_groups), size)
    n = n_groups * size
    y = rng.integers(0, 2, n)
    which = rng.random(n_groups)[groups] < 0.5  # in each group one model is the good one
    good, bad = np.where(rng.random(n) < 0.98, y, 1 - y), np.where(rng.random(n) < 0.3, y, 1 - y)
    a = np.eye(2)[np.where(which, good, bad)]
    b = np.eye(2)[np.where(which, bad, good)]
    return a, b, y, groups


def test_grouped_sign_flips_hold_their_level_where_ungrouped_ones_over_reject():
    rng = np.random.default_rng(5)
    reps, level = 300, 0.05
    plain = grouped = 0
    for t in range(reps):
        a, b, y, groups = _correlated_null(rng, 24, 8)
        plain += metric_permutation_test(a, b, y, n_resamples=199, random_state=t).pvalue <= level
        grouped += metric_permutation_test(a, b, y, n_resamples=199, random_state=t,
                                           groups=groups).pvalue <= level
    assert plain / reps > 0.3  # treating 192 correlated samples as independent
    assert grouped / reps < 0.05 + 3 * np.sqrt(0.05 * 0.95 / reps)


def test_cluster_bootstrap_intervals_cover_where_ungrouped_ones_do_not():
    rng = np.random.default_rng(6)
    reps = 200
    plain = grouped = 0
    for t in range(reps):
        a, b, y, groups = _correlated_null(rng, 30, 8)  # the true difference is 0
        kw = dict(method="percentile", n_resamples=400, random_state=t)
        ci = paired_bootstrap(a, b, y, **kw).ci
        plain += ci[0] <= 0 <= ci[1]
        ci = paired_bootstrap(a, b, y, groups=groups, **kw).ci
        grouped += ci[0] <= 0 <= ci[1]
    assert plain / reps < 0.75
    assert grouped / reps > 0.88  # nominal 0.95; 30 clusters cover a little less


def test_bad_groups_are_refused():
    y = np.array([0, 1] * 10)
    p = np.eye(2)[y]
    with pytest.raises(DataError, match=r"groups: expected one group id per sample, shape \(20,\)"):
        bootstrap_metric(p, y, groups=np.arange(5))
    with pytest.raises(DataError, match="at least 2 groups"):
        paired_bootstrap(p, p, y, groups=np.zeros(20))
    with pytest.raises(ConfigError, match="pass one of them"):
        bootstrap_metric(p, y, groups=np.arange(20) // 2, stratify=True)
    with pytest.raises(DataError, match="NaN"):
        paired_permutation_test(np.ones(3), np.zeros(3), groups=np.array([0.0, np.nan, 1.0]))
