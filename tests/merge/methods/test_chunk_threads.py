"""Chunks computed on several threads give the same bits as on one."""

from __future__ import annotations

import threading

import pytest
import torch

from modelfuse.merge.methods.chunk_threads import ordered_map
from modelfuse.merge.methods.dare import dare_rescale_factors
from modelfuse.merge.methods.della import della_rescale_factors
from modelfuse.merge.methods.sce import sce_reduction


@pytest.fixture
def threads():
    """Run a function under a given torch thread count, restoring it after."""
    before = torch.get_num_threads()

    def run(count, function):
        torch.set_num_threads(count)
        try:
            return function()
        finally:
            torch.set_num_threads(before)

    return run


def test_ordered_map_keeps_order_and_uses_threads():
    seen = set()

    def square(x):
        seen.add(threading.get_ident())
        return x * x

    assert list(ordered_map(square, range(50), workers=3)) == [x * x for x in range(50)]
    assert threading.get_ident() not in seen  # computed on the pool, not the caller
    assert list(ordered_map(square, range(5), workers=1)) == [0, 1, 4, 9, 16]


def _threads_of_a_new_thread() -> int:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


@pytest.mark.parametrize("stop_early", [False, True])
def test_ordered_map_workers_use_one_torch_thread_and_leave_counts_alone(threads, stop_early):
    # with torch's own threads in each chunk thread, two chunk threads would run four
    # threads on two cores; torch's count is per thread, and a thread started later begins
    # with the count last set anywhere
    def work():
        items = ordered_map(lambda _: torch.get_num_threads(), range(20), workers=2)
        counts = [next(items) for _ in range(3)] if stop_early else list(items)
        if stop_early:
            items.close()
        return counts, torch.get_num_threads(), _threads_of_a_new_thread()

    counts, caller, new_thread = threads(3, work)
    assert set(counts) == {1}
    assert caller == 3 and new_thread == 3


def test_ordered_map_stops_early_and_reraises():
    started = []

    def slow(x):
        started.append(x)
        if x == 3:
            raise ValueError("item 3")
        return x

    items = ordered_map(slow, range(1000), workers=2)
    assert [next(items) for _ in range(2)] == [0, 1]
    items.close()
    assert len(started) <= 2 + 3 + 1  # at most workers + 1 ahead of what was handed out
    with pytest.raises(ValueError, match="item 3"):
        list(ordered_map(slow, range(10), workers=2))


def _inputs(shape=(600, 1000), models=2):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    tensors = [(base.float() + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16) for _ in range(models)]
    return tensors, base


@pytest.mark.parametrize(
    "reduce",
    [
        lambda t, b: della_rescale_factors(t, b, density=0.4, epsilon=0.2, name="w"),
        lambda t, b: dare_rescale_factors(t, b, density=0.3, name="w"),
    ],
    ids=["della", "dare"],
)
def test_norm_rescale_reduction_is_the_same_on_one_and_two_threads(threads, reduce):
    tensors, base = _inputs()
    one = threads(1, lambda: reduce(tensors, base))
    two = threads(2, lambda: reduce(tensors, base))
    assert one.factors == two.factors  # the same floats, bit for bit
    for a, b in zip(one.masks, two.masks):
        assert a is not None and b is not None and (a == b).all()
    # and the factor is the formula: L1 of the task vector over L1 of what the mask keeps
    mask = torch.from_numpy(one.masks[0]).view(torch.uint8)
    bits = torch.tensor([(int(v) >> (7 - k)) & 1 for v in mask.tolist() for k in range(8)])
    tau = (tensors[0].float() - base.float()).reshape(-1)
    kept = tau * bits[: tau.numel()]
    expected = tau.double().abs().sum() / kept.double().abs().sum()
    assert one.factors[0] == pytest.approx(float(expected), rel=1e-6)  # float32 row sums


def test_sce_reduction_is_the_same_on_one_and_two_threads(threads):
    tensors, base = _inputs(models=3)
    one = threads(1, lambda: sce_reduction(tensors, base, select_topk=0.3))
    two = threads(2, lambda: sce_reduction(tensors, base, select_topk=0.3))
    assert one == two
    # weights: each model's mean square over the selected entries, normalised
    taus = torch.stack([t.float() - base.float() for t in tensors]).reshape(3, -1)
    variance = taus.var(dim=0, unbiased=False)
    k = int(int((variance > 0).sum()) * 0.3)
    keep = torch.zeros_like(variance)
    keep[torch.argsort(-variance, stable=True)[:k]] = 1
    squares = (taus * keep).double().pow(2).sum(dim=1)
    assert one.weights == pytest.approx((squares / squares.sum()).tolist(), rel=1e-5)
