"""Learned simplex weights against a brute-force grid and a closed-form case."""

from __future__ import annotations

import numpy as np
import pytest

from modelfuse.calibration.metrics import negative_log_likelihood
from modelfuse.ensemble.weights import learn_weights


def test_two_members_match_a_grid_search_of_the_nll() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=2000)
    onehot = np.eye(3)[labels]
    a = 0.6 * onehot + 0.4 * rng.dirichlet(np.ones(3), size=2000)
    b = 0.3 * onehot + 0.7 * rng.dirichlet(np.ones(3), size=2000)
    w = learn_weights([a, b], labels, kind="probabilities")
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    grid = np.linspace(0, 1, 2001)
    nll = [negative_log_likelihood(g * a + (1 - g) * b, labels) for g in grid]
    assert w[0] == pytest.approx(grid[int(np.argmin(nll))], abs=2e-3)


def test_a_useless_member_gets_no_weight_and_logits_are_softmaxed() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=500)
    good = np.where(np.eye(2)[labels] == 1, 3.0, -3.0) + rng.normal(size=(500, 2))
    noise = rng.normal(size=(500, 2))
    w = learn_weights(np.stack([noise, good]), labels, kind="logits")
    assert w[1] > 0.95
