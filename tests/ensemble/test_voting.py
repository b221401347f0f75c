"""Soft voting against the formula written out, and its input checks."""

from __future__ import annotations

import numpy as np
import pytest

from modelfuse.ensemble.voting import check_ensemble_predictions, soft_vote
from modelfuse.errors import DataError


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_weighted_average_of_probabilities_and_of_softmaxed_logits() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50, 4))
    w = np.array([1.0, 2.0, 5.0])
    expected = sum(w[m] / w.sum() * _softmax(logits[m]) for m in range(3))
    np.testing.assert_allclose(soft_vote(logits, kind="logits", weights=w), expected)
    probs = _softmax(logits)
    np.testing.assert_allclose(soft_vote(probs, kind="probabilities", weights=w), expected)
    uniform = soft_vote(list(probs), kind="probabilities")
    np.testing.assert_allclose(uniform, probs.mean(axis=0))


def test_logit_averaging_only_when_asked_is_the_normalised_geometric_mean() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=(2, 20))
    geometric = np.sqrt(probs[0] * probs[1])
    geometric /= geometric.sum(axis=1, keepdims=True)
    got = soft_vote(probs, kind="probabilities", average="logits")
    np.testing.assert_allclose(got, geometric)
    assert not np.allclose(soft_vote(probs, kind="probabilities"), geometric)


def test_float32_stays_float32() -> None:
    probs = np.full((2, 5, 4), 0.25, dtype=np.float32)
    assert soft_vote(probs, kind="probabilities").dtype == np.float32


def test_mismatched_members_name_the_member() -> None:
    a, b = np.full((4, 3), 1 / 3), np.full((5, 3), 1 / 3)
    with pytest.raises(DataError, match=r"b\.npy: shape \(5, 3\) differs from a\.npy's"):
        check_ensemble_predictions([a, b], "probabilities", sources=["a.npy", "b.npy"])


def test_probabilities_must_sum_to_one_and_weights_be_valid() -> None:
    bad = np.full((2, 4, 3), 0.3)
    with pytest.raises(DataError, match="sum to 1"):
        soft_vote(bad, kind="probabilities")
    good = np.full((2, 4, 3), 1 / 3)
    with pytest.raises(DataError, match="non-negative"):
        soft_vote(good, kind="probabilities", weights=[1.0, -1.0])
    with pytest.raises(DataError, match="2 weights"):
        soft_vote(good, kind="probabilities", weights=[1.0])
    with pytest.raises(DataError, match="kind must be"):
        soft_vote(good, kind="auto")
