import numpy as np
import pytest
import torch

from modelfuse.merge.methods.float_sums import SUM_ROW, row_sum


@pytest.mark.parametrize("n", [0, 1, SUM_ROW - 1, SUM_ROW, 5 * SUM_ROW + 17, 1 << 18])
def test_row_sum_is_the_float64_sum_to_float32_accuracy(n):
    g = torch.Generator().manual_seed(n)
    values = torch.rand(n, generator=g) * 1e-3
    exact = float(np.sum(values.double().numpy()))
    assert row_sum(values) == pytest.approx(exact, rel=1e-6, abs=1e-12)


def test_row_sum_is_the_same_on_any_number_of_threads():
    values = torch.rand(1 << 20, generator=torch.Generator().manual_seed(1))
    previous = torch.get_num_threads()
    try:
        sums = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            sums.append(row_sum(values))
    finally:
        torch.set_num_threads(previous)
    assert sums[0] == sums[1] == sums[2]
