"""low_rank_factors against Eckart-Young and the rank rules written out."""

from __future__ import annotations

import math

import pytest
import torch

from modelfuse.lora import low_rank_factors


def _with_spectrum(singular: list[float], rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular), generator=generator))
    return (u * torch.tensor(singular)) @ v.T


def test_low_rank_factors_split_the_singular_values_evenly() -> None:
    delta = _with_spectrum([5.0, 1.0], 4, 3, 0)
    b, a = low_rank_factors(delta, rank=1)
    # B = u1 sqrt(s1), A = sqrt(s1) v1: both carry norm sqrt(5)
    assert float(b.norm()) == pytest.approx(math.sqrt(5.0), rel=1e-5)
    assert float(a.norm()) == pytest.approx(math.sqrt(5.0), rel=1e-5)
    before = delta.clone()
    low_rank_factors(delta, energy=0.5)
    assert torch.equal(delta, before)


def test_large_modules_use_a_randomized_svd_that_still_finds_an_exact_low_rank_update(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import modelfuse.lora.factors as factors

    calls = []
    real = torch.svd_lowrank

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(factors, "_LOWRANK_SIDE", 40)
    monkeypatch.setattr(torch, "svd_lowrank", counted)
    delta = _with_spectrum([5.0, 3.0, 2.0], 60, 48, 3)
    b, a = low_rank_factors(delta, rank=3)
    assert calls == [(60, 48)]
    torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=0)
    b, a = low_rank_factors(delta, energy=0.99)  # an energy threshold needs the whole spectrum
    assert calls == [(60, 48)] and a.shape[0] == 3
