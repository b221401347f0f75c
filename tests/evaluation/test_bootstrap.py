"""Bootstrap intervals: closed forms, coverage in simulation, BCa on a symmetric case."""

import numpy as np
import pytest
from scipy.special import ndtr, ndtri

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation import (
    bca_interval,
    bootstrap_metric,
    paired_bootstrap,
    percentile_interval,
    resample_sums,
)


def _onehot_predictions(rng, y, accuracy, k=2):
    wrong = (y + rng.integers(1, k, len(y))) % k
    return np.eye(k)[np.where(rng.random(len(y)) < accuracy, y, wrong)]


def _value_rows(keys):
    return keys[:, :1].astype(float)


@pytest.mark.parametrize("compress", [True, False])
def test_resampled_mean_has_the_binomial_variance(compress):
    # the bootstrap variance of a mean of 0/1 values is p (1 - p) / n (plug-in p)
    n, n_resamples = 400, 4000
    values = np.zeros(n)
    values[:300] = 1.0
    sums = resample_sums(values, _value_rows, n_resamples, random_state=0, compress=compress)
    means = sums[:, 0] / n
    p = 0.75
    assert means.mean() == pytest.approx(p, abs=0.003)
    assert means.var() == pytest.approx(p * (1 - p) / n, rel=0.08)


@pytest.mark.parametrize("compress", [True, False])
def test_stratified_resampling_keeps_every_stratum_size(compress):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    onehot = np.eye(3)[y]
    sums = resample_sums(
        onehot, lambda keys: keys, 200, strata=y, random_state=1, compress=compress
    )
    np.testing.assert_array_equal(sums, np.tile(np.bincount(y, minlength=3), (200, 1)))


@pytest.mark.parametrize("compress", [True, False])
def test_many_statistics_per_sample_have_multinomial_moments(compress):
    # ten columns per sample (the counting path when not compressed): the counts of each
    # kind of sample in a resample are Multinomial(n, p), so mean n p and variance n p (1 - p)
    rng = np.random.default_rng(0)
    n = 500
    kinds = rng.integers(0, 5, n)

    def rows(keys):
        onehot = np.eye(5)[keys[:, 0].astype(int)]
        return np.hstack([onehot, 2 * onehot])

    sums = resample_sums(kinds[:, None], rows, 3000, random_state=2, compress=compress)
    p = np.bincount(kinds, minlength=5) / n
    np.testing.assert_allclose(sums[:, :5].mean(axis=0), n * p, rtol=0.02)
    np.testing.assert_allclose(sums[:, :5].var(axis=0), n * p * (1 - p), rtol=0.1)
    np.testing.assert_array_equal(sums[:, 5:], 2 * sums[:, :5])


def test_percentile_interval_is_the_central_order_statistics():
    # Davison and Hinkley: d_(j), d_(B+1-j) with j = floor((B + 1) alpha / 2)
    rng = np.random.default_rng(0)
    dist = rng.permutation(np.arange(1, 1001, dtype=float))
    assert percentile_interval(dist, 0.9) == (50.0, 951.0)  # j = floor(1001 * 0.05) = 50
    ordered = np.sort(dist[:999])
    assert percentile_interval(dist[:999], 0.95) == (ordered[24], ordered[999 - 25])


def test_too_few_resamples_for_the_level_are_refused():
    with pytest.raises(ConfigError, match="pass n_resamples >= 39"):
        percentile_interval(np.arange(38.0), 0.95)
    assert percentile_interval(np.arange(39.0), 0.95) == (0.0, 38.0)


def test_bca_equals_percentile_on_a_symmetric_case():
    # replicates symmetric about the estimate (z0 = 0), symmetric jackknife (a = 0)
    rng = np.random.default_rng(0)
    half = rng.normal(size=999)
    dist = np.concatenate([1.0 + half, 1.0 - half])
    jack = np.concatenate([rng.normal(size=50), -rng.normal(size=50)])
    jack = np.concatenate([jack, -jack])
    assert bca_interval(1.0, dist, jack, confidence_level=0.9) == pytest.approx(
        percentile_interval(dist, 0.9), abs=1e-12
    )


def test_bca_end_to_end_close_to_percentile_for_symmetric_data():
    # losses symmetric about their mean: a = 0 exactly, z0 near 0
    values = np.tile(np.array([0.2, 0.4, 0.6, 0.8]), 100)
    probs = np.stack([values, 1 - values], axis=1)
    y = np.zeros(len(values), dtype=int)
    kwargs = dict(metric="brier", n_resamples=4000, random_state=3)
    bca = bootstrap_metric(probs, y, method="bca", **kwargs)
    pct = bootstrap_metric(probs, y, method="percentile", **kwargs)
    width = pct.ci[1] - pct.ci[0]
    assert bca.ci == pytest.approx(pct.ci, abs=0.05 * width)


def test_bca_follows_its_formula_with_bias_and_acceleration():
    rng = np.random.default_rng(1)
    dist = rng.gamma(4.0, size=5000)
    jack = rng.gamma(2.0, size=300)
    estimate = 3.5
    z0 = ndtri(np.mean(dist < estimate))
    d = jack.mean() - jack
    a = np.sum(d**3) / (6 * np.sum(d**2) ** 1.5)
    z = ndtri(np.array([0.025, 0.975]))
    levels = ndtr(z0 + (z0 + z) / (1 - a * (z0 + z)))
    ordered = np.sort(dist)
    expected = (
        ordered[int(np.floor(5001 * levels[0])) - 1],
        ordered[int(np.ceil(5001 * levels[1])) - 1],
    )
    assert bca_interval(estimate, dist, jack) == expected


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_accuracy_intervals_cover_the_true_value_near_the_nominal_rate(method):
    rng = np.random.default_rng(10)
    n, true_accuracy, trials = 200, 0.7, 300
    hits = 0
    for t in range(trials):
        y = rng.integers(0, 2, n)
        probs = _onehot_predictions(rng, y, true_accuracy)
        r = bootstrap_metric(probs, y, method=method, n_resamples=1000, random_state=t)
        hits += r.ci[0] <= true_accuracy <= r.ci[1]
    assert 0.90 <= hits / trials <= 0.985


def test_nll_intervals_cover_the_true_value_near_the_nominal_rate():
    # p_true ~ Uniform(a, 1): E[-log p] = (1 - a + a log a) / (1 - a)
    a = 0.2
    truth = (1 - a + a * np.log(a)) / (1 - a)
    rng = np.random.default_rng(11)
    hits, trials = 0, 200
    for t in range(trials):
        p_true = rng.uniform(a, 1, 150)
        probs = np.stack([p_true, 1 - p_true], axis=1)
        y = np.zeros(150, dtype=int)
        r = bootstrap_metric(probs, y, metric="nll", n_resamples=500, random_state=t)
        hits += r.ci[0] <= truth <= r.ci[1]
    assert 0.89 <= hits / trials <= 0.99


def test_same_seed_same_interval_and_other_seed_other_interval():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    probs = _onehot_predictions(rng, y, 0.6, k=3) * 0.7 + 0.1
    one = bootstrap_metric(probs, y, metric="macro_f1", random_state=5)
    two = bootstrap_metric(probs, y, metric="macro_f1", random_state=5)
    three = bootstrap_metric(probs, y, metric="macro_f1", random_state=6)
    assert one.ci == two.ci
    assert one.ci != three.ci
    assert one.statistic == three.statistic


def test_paired_interval_of_identical_models_is_zero_with_p_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    p = _onehot_predictions(rng, y, 0.8)
    r = paired_bootstrap(p, p.copy(), y, n_resamples=500, random_state=0)
    assert r.statistic == 0 and r.ci == (0.0, 0.0) and r.pvalue == 1.0


def test_paired_interval_is_narrower_than_the_difference_of_independent_ones():
    # two models that agree on most samples: pairing removes the shared variance
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 1000)
    a = _onehot_predictions(rng, y, 0.8)
    b = a.copy()
    flip = rng.choice(1000, 40, replace=False)
    b[flip] = b[flip][:, ::-1]
    paired = paired_bootstrap(a, b, y, n_resamples=2000, random_state=0)
    ra = bootstrap_metric(a, y, n_resamples=2000, random_state=1)
    rb = bootstrap_metric(b, y, n_resamples=2000, random_state=2)
    independent_sd = np.hypot(ra.bootstrap_distribution.std(), rb.bootstrap_distribution.std())
    assert paired.bootstrap_distribution.std() < 0.5 * independent_sd
    # and it is centred on the observed difference of accuracies
    expected = np.mean(a.argmax(1) == y) - np.mean(b.argmax(1) == y)
    assert paired.statistic == pytest.approx(expected)
    assert paired.bootstrap_distribution.mean() == pytest.approx(expected, abs=0.002)


def test_vectorised_and_per_resample_paths_agree_in_distribution():
    # AUROC resamples one metric call at a time; a binary AUROC of hard 0/1 scores is
    # the balanced accuracy, which resamples through sums
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    p = _onehot_predictions(rng, y, 0.75)
    by_sums = bootstrap_metric(p, y, metric="balanced_accuracy", n_resamples=1500,
                               stratify=True, random_state=0, method="percentile")
    by_calls = bootstrap_metric(p, y, metric="auroc", n_resamples=1500, stratify=True,
                                random_state=1, method="percentile")
    assert by_sums.statistic == pytest.approx(by_calls.statistic)
    assert by_sums.bootstrap_distribution.std() == pytest.approx(
        by_calls.bootstrap_distribution.std(), rel=0.1
    )
    assert by_sums.ci == pytest.approx(by_calls.ci, abs=0.015)


def test_ece_is_resampled_through_the_calibration_module():
    from modelfuse.calibration.metrics import expected_calibration_error

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    conf = rng.uniform(0.5, 1.0, 400)
    p = np.where((y == 0)[:, None], np.stack([conf, 1 - conf], 1), np.stack([1 - conf, conf], 1))
    r = bootstrap_metric(p, y, metric="ece", n_resamples=300, random_state=0,
                         method="percentile")
    assert r.statistic == pytest.approx(expected_calibration_error(p, y))
    assert r.ci[0] < r.ci[1]


def test_auroc_with_a_rare_class_asks_for_stratification():
    y = np.zeros(40, dtype=int)
    y[0] = 1
    p = np.tile([0.6, 0.4], (40, 1))
    with pytest.raises(DataError, match="stratify=True"):
        bootstrap_metric(p, y, metric="auroc", n_resamples=50, random_state=0)
    r = bootstrap_metric(p, y, metric="auroc", n_resamples=50, random_state=0, stratify=True,
                         method="percentile")
    assert r.statistic == 0.5


def test_result_prints_as_one_line():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p = _onehot_predictions(rng, y, 0.8)
    text = str(paired_bootstrap(p, p[::-1], y, n_resamples=100, random_state=0, names=("x", "y")))
    assert "\n" not in text and "accuracy x - y" in text and "95% CI" in text


def test_bad_options_are_rejected():
    p = np.eye(2)[[0, 1, 0, 1]]
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ConfigError, match="bca, percentile"):
        bootstrap_metric(p, y, method="student")
    with pytest.raises(ConfigError, match="confidence_level"):
        bootstrap_metric(p, y, confidence_level=95)
    with pytest.raises(ConfigError, match="n_resamples"):
        bootstrap_metric(p, y, n_resamples=1)
    with pytest.raises(DataError, match="shape"):
        paired_bootstrap(p, np.eye(3)[[0, 1, 0, 1]], y)


def test_results_say_how_the_interval_was_made() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    a = np.eye(2)[np.where(rng.random(60) < 0.8, y, 1 - y)]
    b = np.eye(2)[np.where(rng.random(60) < 0.6, y, 1 - y)]
    common = dict(n_resamples=1000, random_state=0)
    assert bootstrap_metric(a, y, **common).method == "bootstrap BCa"
    assert (
        bootstrap_metric(a, y, method="percentile", stratify=True, **common).method
        == "bootstrap percentile (stratified)"
    )
    assert paired_bootstrap(a, b, y, **common).method == "paired bootstrap BCa"
    assert (
        paired_bootstrap(a, b, y, stratify=True, **common).method
        == "paired bootstrap BCa (stratified)"
    )
