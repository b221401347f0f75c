"""Uncertainty, pairwise diversity and the ambiguity decomposition against their formulas."""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest
import scipy.stats

import modelfuse.ensemble.diversity as diversity_module
from modelfuse.ensemble import (
    ambiguity_decomposition,
    caruana_selection,
    early_exit_cascade,
    pairwise_diversity,
    uncertainty_decomposition,
)
from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation import risk_coverage_curve


def _members(seed: int = 0, m: int = 4, n: int = 60, k: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(k) * 0.7, size=(m, n))


def test_examples_run() -> None:
    result = doctest.testmod(diversity_module)
    assert result.attempted > 0 and result.failed == 0


def test_uncertainty_matches_scipy_entropies() -> None:
    p = _members()
    u = uncertainty_decomposition(p, kind="probabilities")
    for i in range(p.shape[1]):
        total = scipy.stats.entropy(p[:, i].mean(axis=0))
        expected = np.mean([scipy.stats.entropy(p[m, i]) for m in range(p.shape[0])])
        assert u.total[i] == pytest.approx(total, abs=1e-12)
        assert u.aleatoric[i] == pytest.approx(expected, abs=1e-12)
        assert u.epistemic[i] == pytest.approx(total - expected, abs=1e-12)
    assert (u.epistemic >= 0).all()
    assert u.mean_total == pytest.approx(u.mean_aleatoric + u.mean_epistemic)


def test_uncertainty_weights_and_logits() -> None:
    p = _members(1, m=3)
    w = np.array([0.5, 0.3, 0.2])
    u = uncertainty_decomposition(np.log(p) + 2.0, kind="logits", weights=[5, 3, 2])
    mix = np.tensordot(w, p, axes=(0, 0))
    total = scipy.stats.entropy(mix, axis=1)
    aleatoric = sum(w[m] * scipy.stats.entropy(p[m], axis=1) for m in range(3))
    np.testing.assert_allclose(u.total, total, atol=1e-10)
    np.testing.assert_allclose(u.aleatoric, aleatoric, atol=1e-10)


def test_uncertainty_hand_worked() -> None:
    # two members, one sample: (1, 0) and (0.5, 0.5). H[(0.75, 0.25)] and (0 + ln 2) / 2
    u = uncertainty_decomposition(np.array([[[1.0, 0.0]], [[0.5, 0.5]]]), kind="probabilities")
    total = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert u.total[0] == pytest.approx(total)
    assert u.aleatoric[0] == pytest.approx(np.log(2) / 2)
    assert u.epistemic[0] == pytest.approx(total - np.log(2) / 2)
    # identical members: no epistemic uncertainty
    same = uncertainty_decomposition(np.stack([_members()[0]] * 3), kind="probabilities")
    np.testing.assert_allclose(same.epistemic, 0.0, atol=1e-12)


def _pair_counts(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int, int]:
    return (
        int(np.sum(a & b)),
        int(np.sum(~a & ~b)),
        int(np.sum(a & ~b)),
        int(np.sum(~a & b)),
    )


def test_pairwise_against_counts_and_pearson() -> None:
    p = _members(2, m=4, n=200)
    y = np.random.default_rng(3).integers(0, 3, 200)
    d = pairwise_diversity(p, y, kind="probabilities")
    predicted = p.argmax(axis=2)
    right = predicted == y
    qs, rs, ds = [], [], []
    for i, j in itertools.combinations(range(4), 2):
        n11, n00, n10, n01 = _pair_counts(right[i], right[j])
        q = (n11 * n00 - n10 * n01) / (n11 * n00 + n10 * n01)
        r = np.corrcoef(~right[i], ~right[j])[0, 1]
        dis = np.mean(predicted[i] != predicted[j])
        assert d.q_statistic[i, j] == pytest.approx(q)
        assert d.q_statistic[j, i] == pytest.approx(q)
        assert d.error_correlation[i, j] == pytest.approx(r)
        assert d.disagreement[i, j] == pytest.approx(dis)
        qs.append(q), rs.append(r), ds.append(dis)
    assert d.mean_q_statistic == pytest.approx(np.mean(qs))
    assert d.mean_error_correlation == pytest.approx(np.mean(rs))
    assert d.mean_disagreement == pytest.approx(np.mean(ds))
    assert np.all(np.diag(d.disagreement) == 0)


def test_pairwise_hand_worked() -> None:
    # labels 0 0 1 1 1; member a right on 1,2,3,4 (wrong on 0); b right on 0,1,2 (wrong 3,4)
    y = np.array([0, 0, 1, 1, 1])
    a = np.eye(2)[[1, 0, 1, 1, 1]]
    b = np.eye(2)[[0, 0, 1, 0, 0]]
    d = pairwise_diversity([a, b], y, kind="probabilities")
    # N11 = 2 (1, 2), N00 = 0, N10 = 2 (3, 4), N01 = 1 (0)
    assert d.q_statistic[0, 1] == pytest.approx((2 * 0 - 2 * 1) / (2 * 0 + 2 * 1))
    corr = (2 * 0 - 2 * 1) / np.sqrt((2 + 2) * (1 + 0) * (2 + 1) * (2 + 0))
    assert d.error_correlation[0, 1] == pytest.approx(corr)
    assert d.disagreement[0, 1] == pytest.approx(3 / 5)


def test_pairwise_without_labels_and_undefined_pairs() -> None:
    p = _members(4)
    d = pairwise_diversity(p, kind="probabilities")
    assert d.q_statistic is None and np.isnan(d.mean_q_statistic)
    # a member that is always right: its error correlation is undefined (NaN), and left out
    y = p[0].argmax(axis=1)
    d = pairwise_diversity(p, y, kind="probabilities")
    assert np.isnan(d.error_correlation[0, 1:]).all()
    finite = [d.error_correlation[i, j] for i, j in itertools.combinations(range(1, 4), 2)]
    assert d.mean_error_correlation == pytest.approx(np.mean(finite))
    one = pairwise_diversity(p[:1], kind="probabilities")
    assert one.mean_disagreement == 0.0


@pytest.mark.parametrize("loss", ["brier", "nll"])
def test_ambiguity_identity_exact(loss: str) -> None:
    p = _members(5, m=5, n=80, k=4)
    y = np.random.default_rng(6).integers(0, 4, 80)
    w = np.array([1.0, 2.0, 0.5, 0.0, 1.5])
    d = ambiguity_decomposition(p, y, kind="probabilities", loss=loss, weights=w)
    wn = w / w.sum()
    mix = np.tensordot(wn, p, axes=(0, 0))
    onehot = np.eye(4)[y]
    if loss == "brier":
        ensemble = np.mean(((mix - onehot) ** 2).sum(axis=1))
        members = [np.mean(((p[m] - onehot) ** 2).sum(axis=1)) for m in range(5)]
        ambiguity = np.mean(sum(wn[m] * ((p[m] - mix) ** 2).sum(axis=1) for m in range(5)))
    else:
        rows = np.arange(80)
        ensemble = np.mean(-np.log(mix[rows, y]))
        members = [np.mean(-np.log(p[m, rows, y])) for m in range(5)]
        log_mean = np.log(mix[rows, y])
        mean_log = sum(wn[m] * np.log(p[m, rows, y]) for m in range(5))
        ambiguity = np.mean(log_mean - mean_log)
    assert d.ensemble_loss == pytest.approx(ensemble, rel=1e-12)
    np.testing.assert_allclose(d.member_losses, members, rtol=1e-12)
    assert d.ambiguity == pytest.approx(ambiguity, rel=1e-10)
    assert d.ensemble_loss == pytest.approx(d.mean_member_loss - d.ambiguity, rel=1e-12)
    assert d.ambiguity > 0 and (d.per_sample_ambiguity >= 0).all()


def test_ambiguity_hand_worked() -> None:
    # members (0.8, 0.2) and (0.4, 0.6), label 0; mean (0.6, 0.4)
    a = np.array([[0.8, 0.2]])
    b = np.array([[0.4, 0.6]])
    brier = ambiguity_decomposition([a, b], np.array([0]), kind="probabilities")
    assert brier.ensemble_loss == pytest.approx(0.4**2 + 0.4**2)  # 0.32
    assert brier.mean_member_loss == pytest.approx((0.08 + 0.72) / 2)  # 0.4
    assert brier.ambiguity == pytest.approx(0.2**2 * 2)  # each member 0.2 away in both classes
    nll = ambiguity_decomposition([a, b], np.array([0]), kind="probabilities", loss="nll")
    assert nll.ensemble_loss == pytest.approx(-np.log(0.6))
    assert nll.ambiguity == pytest.approx(np.log(0.6) - (np.log(0.8) + np.log(0.4)) / 2)


def test_bad_inputs() -> None:
    p = _members()
    with pytest.raises(ConfigError, match="loss: unknown 'hinge'; expected one of brier, nll"):
        ambiguity_decomposition(p, np.zeros(60, dtype=int), kind="probabilities", loss="hinge")
    with pytest.raises(DataError, match="labels"):
        ambiguity_decomposition(p, np.zeros(59, dtype=int), kind="probabilities")
    with pytest.raises(DataError, match="weights"):
        uncertainty_decomposition(p, kind="probabilities", weights=[1, 2])
    with pytest.raises(DataError):
        pairwise_diversity(p[0], kind="probabilities")
    before = p.copy()
    uncertainty_decomposition(p, kind="probabilities")
    pairwise_diversity(p, np.zeros(60, dtype=int), kind="probabilities")
    np.testing.assert_array_equal(p, before)


def test_caruana_reports_gain_and_diversity() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, 300)
    # noisy members right on different samples: the average beats each
    p = np.stack(
        [
            np.where(rng.random((300, 1)) < 0.6, np.eye(3)[y], rng.dirichlet(np.ones(3), 300))
            for _ in range(4)
        ]
    )
    p = 0.9 * p + 0.1 / 3
    r = caruana_selection(p, y, kind="probabilities", n_rounds=15, random_state=0)
    single = [-np.mean(np.log(p[m, np.arange(300), y])) for m in range(4)]
    assert r.gain == pytest.approx(min(single) - r.loss)
    assert r.gain > 0
    chosen = np.flatnonzero(r.weights > 0)
    assert len(chosen) > 1
    pairs = [
        np.mean(p[i].argmax(1) != p[j].argmax(1)) for i, j in itertools.combinations(chosen, 2)
    ]
    assert r.disagreement == pytest.approx(np.mean(pairs))
    mix = np.tensordot(r.weights[chosen], p[chosen], axes=(0, 0))
    mi = scipy.stats.entropy(mix, axis=1) - sum(
        r.weights[m] * scipy.stats.entropy(p[m], axis=1) for m in chosen
    )
    assert r.mutual_information == pytest.approx(mi.mean(), rel=1e-9)


def test_caruana_single_member_has_no_diversity() -> None:
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 50)
    good = 0.9 * np.eye(2)[y] + 0.05
    bad = np.full((50, 2), 0.5)
    r = caruana_selection([good, bad], y, kind="probabilities", n_rounds=3, random_state=0)
    assert r.counts[1] == 0
    assert r.disagreement == 0.0 and r.mutual_information == pytest.approx(0.0, abs=1e-12)
    assert r.gain == pytest.approx(0.0, abs=1e-12)


def test_cascade_reports_risk_coverage() -> None:
    p = _members(9, m=3, n=100)
    y = np.random.default_rng(10).integers(0, 3, 100)
    plain = early_exit_cascade(p, kind="probabilities")
    assert plain.risk_coverage is None
    r = early_exit_cascade(p, kind="probabilities", labels=y)
    expected = risk_coverage_curve(r.probabilities.max(axis=1), r.probabilities.argmax(axis=1) == y)
    assert r.risk_coverage.aurc == pytest.approx(expected.aurc)
    assert r.risk_coverage.risk[-1] == pytest.approx(np.mean(r.probabilities.argmax(1) != y))
    with pytest.raises(DataError, match="labels"):
        early_exit_cascade(p, kind="probabilities", labels=y[:5])
