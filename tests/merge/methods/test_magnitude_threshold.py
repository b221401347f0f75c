import numpy as np
import pytest
import torch

from modelfuse.merge.methods.magnitude_selection import select_top_k
from modelfuse.merge.methods.magnitude_threshold import TensorSelection, position_of_one

from .._reference import top_k_positions


@pytest.mark.parametrize("n", [5, 4096 * 4 - 1, 4096 * 4, 4096 * 9 + 17])
@pytest.mark.parametrize("density", [0.0005, 0.3, 1.0])
def test_position_of_one_is_the_qth_listed_one(n, density):
    g = torch.Generator().manual_seed(n)
    flags = (torch.rand(n, generator=g) < density).float()
    flags[-1] = 1.0  # at least one, and one in the partial last block
    ones = np.flatnonzero(flags.numpy())
    for q in sorted({1, min(2, len(ones)), len(ones) // 2 or 1, len(ones) - 1 or 1, len(ones)}):
        assert position_of_one(flags, q) == ones[q - 1]


@pytest.mark.parametrize("k", [1, 20_000, 49_999])
def test_a_whole_long_tensors_cutoff_keeps_ties_in_index_order(k):
    """One chunk of 50000 entries (the block search, not a listing of every tie): the
    selection keeps exactly the k largest, ties to the lower index, as a stable argsort."""
    g = torch.Generator().manual_seed(k)
    values = torch.randint(1, 5, (50_000,), generator=g).float()
    selection = TensorSelection.of(select_top_k(lambda: [values], k, 50_000), lambda: [values])
    kept = (values > selection.value).numpy()
    assert selection.cutoff is not None
    kept[: selection.cutoff] |= (values[: selection.cutoff] == selection.value).numpy()
    expected = np.zeros(50_000, dtype=bool)
    expected[top_k_positions(values.numpy(), k)] = True
    assert np.array_equal(kept, expected)
