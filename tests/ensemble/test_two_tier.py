"""Two-tier ensembles against the formula written out."""

from __future__ import annotations

import numpy as np
import pytest

from modelfuse.ensemble.two_tier import two_tier_ensemble
from modelfuse.ensemble.weights import learn_weights
from modelfuse.errors import ConfigError, DataError


def test_inner_average_then_outer_weights() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=(5, 40))
    groups = ["run1", "run2", "run1", "run2", "base"]
    result = two_tier_ensemble(p, groups, kind="probabilities", weights=[0.5, 0.3, 0.2])
    run1, run2, base = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2, p[4]
    np.testing.assert_allclose(result.probabilities, 0.5 * run1 + 0.3 * run2 + 0.2 * base)
    assert result.groups == ["run1", "run2", "base"]
    np.testing.assert_allclose(result.member_weights, [0.25, 0.15, 0.25, 0.15, 0.2])
    # equivalent to one flat weighted vote with the member weights
    flat = np.tensordot(result.member_weights, p, axes=(0, 0))
    np.testing.assert_allclose(result.probabilities, flat)


def test_learned_group_weights_are_learned_on_the_group_averages() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=300)
    onehot = np.eye(3)[labels]
    p = np.stack([0.5 * onehot + 0.5 * rng.dirichlet(np.ones(3), size=300) for _ in range(4)])
    groups = [0, 0, 1, 1]
    result = two_tier_ensemble(p, groups, kind="probabilities", weights="learned", labels=labels)
    inner = np.stack([p[:2].mean(0), p[2:].mean(0)])
    np.testing.assert_allclose(
        result.group_weights, learn_weights(inner, labels, kind="probabilities")
    )


def test_bad_groups() -> None:
    p = np.full((2, 3, 2), 0.5)
    with pytest.raises(DataError, match="2 models"):
        two_tier_ensemble(p, ["a"], kind="probabilities")
    with pytest.raises(ConfigError, match="labels"):
        two_tier_ensemble(p, ["a", "b"], kind="probabilities", weights="learned")
