"""Caruana selection: weights, the guarantee against the best member, a naive re-implementation."""

from __future__ import annotations

import numpy as np
import pytest

from modelfuse.calibration.metrics import brier_score, negative_log_likelihood
from modelfuse.ensemble.selection import caruana_selection
from modelfuse.errors import ConfigError


def _library(
    seed: int, n_models: int = 8, n: int = 300, k: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=n)
    onehot = np.eye(k)[labels]
    skill = rng.uniform(0.05, 0.6, size=(n_models, 1, 1))
    probs = skill * onehot[None] + (1 - skill) * rng.dirichlet(np.ones(k), size=(n_models, n))
    return probs, labels


def _loss(metric: str, probs: np.ndarray, labels: np.ndarray) -> float:
    if metric == "nll":
        return negative_log_likelihood(probs, labels)
    if metric == "brier":
        return brier_score(probs, labels)
    return float((probs.argmax(axis=1) != labels).mean())


def _naive(probs, labels, metric, n_rounds, n_init):
    """Recompute the average from the chosen list at every step (what the running sums avoid)."""
    chosen: list[int] = []
    if n_init:
        single = [_loss(metric, p, labels) for p in probs]
        chosen = list(np.argsort(single, kind="stable")[:n_init])
    trajectory = [
        _loss(metric, probs[chosen[: i + 1]].mean(axis=0), labels) for i in range(len(chosen))
    ]
    for _ in range(n_rounds):
        losses = [
            _loss(metric, probs[chosen + [m]].mean(axis=0), labels) for m in range(len(probs))
        ]
        chosen.append(int(np.argmin(losses)))
        trajectory.append(min(losses))
    return chosen, np.array(trajectory)


@pytest.mark.parametrize("metric", ["nll", "brier", "accuracy"])
@pytest.mark.parametrize("n_init", [0, 3])
def test_matches_a_naive_reimplementation(metric: str, n_init: int) -> None:
    probs, labels = _library(0)
    result = caruana_selection(
        probs,
        labels,
        kind="probabilities",
        metric=metric,
        n_rounds=12,
        n_init=n_init,
        random_state=0,
    )
    chosen, trajectory = _naive(probs, labels, metric, 12, n_init)
    np.testing.assert_allclose(result.trajectory, trajectory, rtol=1e-9, atol=1e-12)
    if metric != "accuracy":  # accuracy ties are broken at random, the naive loop takes the first
        best = int(np.argmin(trajectory)) + 1
        assert result.best_iteration == best
        np.testing.assert_array_equal(result.counts, np.bincount(chosen[:best], minlength=8))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("metric", ["nll", "brier", "accuracy"])
def test_weights_sum_to_one_and_never_worse_than_the_best_member(seed: int, metric: str) -> None:
    probs, labels = _library(seed)
    result = caruana_selection(
        probs, labels, kind="probabilities", metric=metric, n_rounds=20, n_init=2, random_state=seed
    )
    assert result.weights.sum() == pytest.approx(1.0)
    assert (result.weights >= 0).all()
    best_member = min(_loss(metric, p, labels) for p in probs)
    ensemble = np.tensordot(result.weights, probs, axes=(0, 0))
    assert _loss(metric, ensemble, labels) <= best_member + 1e-12
    assert result.loss == pytest.approx(_loss(metric, ensemble, labels))
    np.testing.assert_allclose(result.weights, result.counts / result.counts.sum())


def test_ties_are_broken_by_the_seed() -> None:
    probs, labels = _library(1, n_models=3)
    twins = np.concatenate([probs, probs])  # every member has an identical twin
    picks = {
        tuple(
            caruana_selection(
                twins, labels, kind="probabilities", n_rounds=1, random_state=s
            ).counts
        )
        for s in range(20)
    }
    assert len(picks) == 2  # the best member or its twin
    first = caruana_selection(twins, labels, kind="probabilities", n_rounds=5, random_state=3)
    again = caruana_selection(twins, labels, kind="probabilities", n_rounds=5, random_state=3)
    np.testing.assert_array_equal(first.counts, again.counts)


def test_bagging_averages_the_bags() -> None:
    probs, labels = _library(2)
    result = caruana_selection(
        probs, labels, kind="probabilities", n_rounds=10, n_bags=6, bag_fraction=0.5, random_state=0
    )
    assert result.weights.sum() == pytest.approx(1.0)
    assert result.counts.sum() >= 6  # at least one pick per bag
    assert (result.weights > 0).sum() >= 2


def test_logits_are_softmaxed_and_options_checked() -> None:
    probs, labels = _library(3)
    logits = np.log(probs) + 7.0  # a per-row shift: same softmax
    a = caruana_selection(probs, labels, kind="probabilities", random_state=0)
    b = caruana_selection(logits, labels, kind="logits", random_state=0)
    np.testing.assert_allclose(a.weights, b.weights)
    with pytest.raises(ConfigError, match="metric"):
        caruana_selection(probs, labels, kind="probabilities", metric="auc")
    with pytest.raises(ConfigError, match="n_rounds"):
        caruana_selection(probs, labels, kind="probabilities", n_rounds=-1)
