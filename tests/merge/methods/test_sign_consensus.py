"""TIES' sign election and disjoint mean against the formula written out entry by entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelfuse.merge.methods.sign_consensus import agreeing_sums, elect_signs
from modelfuse.merge.methods.workspace import Workspace


def _disjoint_mean(values, scales, weights, tally):
    """Entry by entry: the elected sign is + where the tally is >= 0 (-0.0 included);
    the agreeing models' scaled values summed, over their weights (a zero sum counts as one)."""
    out = np.zeros(len(tally))
    for e in range(len(tally)):
        sign = 1.0 if tally[e] >= 0 else -1.0
        agree = [i for i in range(len(values)) if values[i][e] * sign > 0]
        total = sum(np.float32(scales[i]) * values[i][e] for i in agree)
        divisor = sum(weights[i] for i in agree)
        out[e] = total / (divisor if divisor != 0 else 1.0)
    return out


def _values(n: int, models: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(n, generator=g).round() for _ in range(models)]  # many ties and zeros
    values[0][:10] = -0.0
    values[1][:5] = -values[0][:5]  # sums of exactly zero
    values[1][5:10] = -0.0  # sums of -0.0
    return values


@pytest.mark.parametrize(
    "weights", [[1.0, 1.0, 1.0], [0.5, 2.0, 1.0], [1.0, 0.0, 2.0], [1.0, -0.5, 1.0]]
)
def test_elect_signs_is_the_disjoint_mean_of_the_formula(weights):
    values = _values(500, 3, 0)
    base = torch.zeros(500)
    workspace = Workspace(500)
    sums, divisor = elect_signs(
        values, base, slice(0, 500), 0, [None] * 3, weights, "sum", True, workspace
    )
    assert divisor is not None
    merged = sums / divisor
    # a weight of zero or below first weighs its values (it changes their signs)
    weighted = [v.numpy() * np.float32(w) if w <= 0 else v.numpy() for v, w in zip(values, weights)]
    scales = [1.0 if w <= 0 else w for w in weights]
    tally = sum(np.float32(s) * v for s, v in zip(scales, weighted))
    expected = _disjoint_mean(weighted, scales, weights, tally)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-6, atol=0)


def test_agreeing_sums_on_a_tally_of_minus_zero_take_nothing():
    """A tally of -0.0 sums only zeros: no model agrees with either sign."""
    a = torch.tensor([-0.0, -0.0, 2.0])
    b = torch.tensor([-0.0, 0.0, -1.0])
    tally = a + b  # -0.0, 0.0, 1.0
    assert torch.signbit(tally[0]) and not torch.signbit(tally[1])
    divisor = torch.empty(3)
    merged = agreeing_sums([a, b], [1.0, 1.0], [1.0, 1.0], tally, torch.empty(3), divisor, Workspace(3))
    assert merged.tolist() == [0.0, 0.0, 2.0]
    assert divisor.tolist() == [0.0, 0.0, 1.0]
