"""Each branch of the recommendation, from task vectors built to land in it, and the barrier."""

from __future__ import annotations

import math

import pytest
import torch

from modelfuse.errors import ConfigError, DataError
from modelfuse.inspection import THRESHOLDS, interpolation_barrier, recommend, tensor_figures
from modelfuse.inspection.barrier import Barrier

N = 20_000


def _figures(*taus, overlap=0.2, weight=None):
    base = torch.zeros(N)
    return tensor_figures(list(taus), base, overlap_density=overlap, weight=weight)


def _random(seed):
    return torch.randn(N, generator=torch.Generator().manual_seed(seed))


def test_one_model_is_task_arithmetic():
    found = recommend(_figures(_random(0)), ["a"])
    assert found.method == "task_arithmetic" and "one model" in found.summary


def test_aligned_task_vectors_are_averaged():
    a = _random(0)
    figures = _figures(a, a + 0.5 * _random(1))
    assert figures.mean_cosine >= THRESHOLDS["aligned_cosine"]
    found = recommend(figures, ["a", "b"])
    assert found.method == "linear" and "largely agree" in found.summary


def test_opposed_task_vectors_are_ties():
    a = _random(0)
    figures = _figures(a, -a + 0.3 * _random(1))
    assert figures.conflict >= THRESHOLDS["high_conflict"]
    found = recommend(figures, ["a", "b"], overlap_density=0.2)
    assert found.method == "ties" and "high interference" in found.summary


def test_orthogonal_sparse_task_vectors_are_task_arithmetic():
    # disjoint supports: orthogonal and no entry where both are non-zero
    a, b = _random(0), _random(1)
    a[N // 2 :] = 0
    b[: N // 2] = 0
    figures = _figures(a, b)
    assert figures.conflict == 0 and abs(figures.mean_cosine) < 1e-6
    found = recommend(figures, ["a", "b"])
    assert found.method == "task_arithmetic" and "nearly orthogonal" in found.summary


def test_independent_dense_task_vectors_are_ties_at_the_overlap_density():
    # independent signs: about 25% conflict untrimmed and about d / 4 trimmed to density d
    figures = _figures(_random(0), _random(1), overlap=0.2)
    assert figures.conflict == pytest.approx(0.25, abs=0.02)
    assert figures.trimmed_conflict == pytest.approx(0.05, abs=0.01)
    found = recommend(figures, ["a", "b"], overlap_density=0.2)
    assert found.method == "ties" and "lowers to 5%" in found.summary


def test_moderate_conflict_without_a_trim_is_task_arithmetic_with_a_smaller_lambda():
    figures = _figures(_random(0), _random(1), overlap=1.0)
    assert figures.trimmed_conflict is None
    found = recommend(figures, ["a", "b"], overlap_density=1.0)
    assert found.method == "task_arithmetic" and "lambda below 1" in found.summary


def test_a_barrier_advises_against_averaging_and_extra_reasons_are_given():
    a = _random(0)
    figures = _figures(a, 5 * a + _random(1))
    barrier = Barrier("a", "b", (0.0, 0.5, 1.0), (1.0, 2.0, 1.0), 1.0, 0.5)
    found = recommend(figures, ["a", "b"], barriers=[barrier])
    assert found.method == "ensemble" and "loss barrier of 1" in found.summary
    assert any("norms differ" in r for r in found.reasons)
    assert any("b makes" in r and "of the merged delta" in r for r in found.reasons)
    small = Barrier("a", "b", (0.0, 0.5, 1.0), (1.0, 1.01, 1.0), 0.01, 0.5)
    assert recommend(figures, ["a", "b"], barriers=[small]).method == "linear"


def test_barrier_of_a_convex_loss_is_zero_and_of_a_concave_one_is_closed_form():
    a, b = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([3.0, 1.0])}
    convex = interpolation_barrier(a, b, lambda s: float((s["w"] ** 2).sum()), alphas=21)
    assert convex.barrier == 0.0
    concave = interpolation_barrier(a, b, lambda s: -float((s["w"] ** 2).sum()), alphas=21)
    # -|a + t (b - a)|^2 minus the chord is t (1 - t) |b - a|^2: 13 / 4 at t = 1/2
    assert concave.barrier == pytest.approx(13 / 4) and concave.alpha == 0.5
    assert concave.relative == pytest.approx(13 / 4 / ((5 + 10) / 2))


def test_barrier_refusals():
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    with pytest.raises(ConfigError, match="at least 3 points"):
        interpolation_barrier(a, b, lambda s: 0.0, alphas=2)
    with pytest.raises(ConfigError, match="different tensors"):
        interpolation_barrier(a, {"v": torch.ones(2)}, lambda s: 0.0)
    with pytest.raises(DataError, match="expected a finite number"):
        interpolation_barrier(a, b, lambda s: math.nan)


def test_low_conflict_at_the_configured_trim_keeps_ties():
    figures = _figures(_random(0), _random(1), overlap=0.2)
    trimmed = tensor_figures(
        [_random(0), _random(1)], torch.zeros(N), overlap_density=0.2, conflict_density=0.2
    )
    assert trimmed.conflict < THRESHOLDS["low_conflict"] <= figures.conflict
    found = recommend(trimmed, ["a", "b"], overlap_density=0.2, conflict_density=0.2)
    assert found.method == "ties" and "as configured" in found.summary
