import numpy as np
import pytest
import torch

from modelfuse.merge.methods.in_memory_top_k import top_k_members
from modelfuse.merge.methods.magnitude_selection import sample_stride

from .._reference import top_k_positions


def _expected(values: np.ndarray, k: int) -> np.ndarray:
    """The k largest by a stable sort (ties to the lower index), zeros left out."""
    kept = np.zeros(values.size, dtype=bool)
    kept[top_k_positions(values, k)] = True
    return kept & (values > 0)


def _rows(n: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(n)
    continuous = torch.randn(n, generator=g).abs()
    # the magnitudes of bfloat16 task vectors: few distinct values, heavily tied
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    model = (base.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16)
    tied = (model.float() - base.float()).abs()
    few = torch.randint(0, 4, (n,), generator=g).float()  # a quarter are zeros
    return {
        "continuous": continuous.numpy(),
        "bfloat16 deltas": tied.numpy(),
        "four values": few.numpy(),
    }


@pytest.mark.parametrize("n", [50, 3000, 70_000])
@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.8, 0.99])
def test_the_k_largest_with_ties_to_the_lower_index(n, density):
    for name, values in _rows(n).items():
        k = max(1, int(density * n))
        found = top_k_members(values, k)
        assert np.array_equal(found, _expected(values, k)), name
        assert found.sum() == min(k, np.count_nonzero(values)), name


def test_counts_past_the_non_zero_entries_keep_those_only():
    values = np.array([0.0, 2.0, 0.0, 1.0, 1.0], dtype=np.float32)
    assert top_k_members(values, 4).tolist() == [False, True, False, True, True]
    assert top_k_members(values, 9).tolist() == [False, True, False, True, True]
    assert not top_k_members(values, 0).any()


def test_a_misleading_sample_still_gives_the_exact_set(monkeypatch):
    """The sampled entries (every stride-th) are all 1 while half of the others are 2: the
    sample's guess and bracket both miss, and the streamed selection answers."""
    from modelfuse.merge.methods import in_memory_top_k

    n = 20_000
    stride = sample_stride(n)
    values = np.where(np.arange(n) % 2 == 0, 2.0, 0.5).astype(np.float32)
    values[::stride] = 1.0
    calls = []
    streamed = in_memory_top_k.select_top_k
    monkeypatch.setattr(
        in_memory_top_k, "select_top_k", lambda *a: calls.append(a) or streamed(*a)
    )
    for k in (100, 5_000, 9_000):
        assert np.array_equal(top_k_members(values, k), _expected(values, k))
    assert len(calls) == 3
