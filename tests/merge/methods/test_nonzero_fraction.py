import pytest
import torch

from modelfuse.merge.methods import nonzero_fraction
from modelfuse.merge.methods.magnitude_selection import sample_stride, select_top_k
from modelfuse.merge.methods.nonzero_fraction import select_nonzero_fraction


def _values(n: int, zeros: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, generator=g).square_()
    values[torch.rand(n, generator=g) < zeros] = 0.0
    return values


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.97])
@pytest.mark.parametrize("zeros", [0.0, 0.3])
def test_one_pass_gives_the_count_and_the_selection_of_two(fraction, zeros):
    n = 300_000
    values = _values(n, zeros, seed=int(fraction * 100))
    chunks = [values[a : a + 65_536] for a in range(0, n, 65_536)]
    calls = []

    def each() -> list[torch.Tensor]:
        calls.append(1)
        return chunks

    sample = values[:: sample_stride(n)].clone()
    k, found = select_nonzero_fraction(each, fraction, n, sample)
    assert k == int(int(torch.count_nonzero(values)) * fraction)  # written out
    assert len(calls) == 1 and found is not None
    expected = select_top_k(lambda: chunks, k, n, sample)
    assert (found.value, found.tie_quota) == (expected.value, expected.tie_quota)
    kept = int((values > found.value).sum()) + (found.tie_quota or {"": 0})[""]
    if found.tie_quota is None:
        kept = int((values >= found.value).sum())
    assert kept == k


def test_a_misleading_sample_or_a_wide_band_leaves_the_selection_to_the_caller(monkeypatch):
    n = 100_000
    values = torch.full((n,), 0.5)
    values[1::2] = 2.0
    stride = sample_stride(n)
    sample = values[::stride].clone()
    sample.fill_(0.5)  # predicts no value above 0.5
    k, found = select_nonzero_fraction(lambda: [values], 0.25, n, sample)
    assert k == 25_000 and found is None
    monkeypatch.setattr(nonzero_fraction, "BAND_ENTRIES", 10)
    values = _values(n, 0.0, seed=3)
    k, found = select_nonzero_fraction(lambda: [values], 0.5, n, values[::stride].clone())
    assert k == 50_000 and found is None  # the band is not gathered


def test_no_non_zero_value_keeps_nothing():
    values = torch.zeros(10_000)
    assert select_nonzero_fraction(lambda: [values], 0.5, 10_000, values[::10].clone()) == (0, None)
