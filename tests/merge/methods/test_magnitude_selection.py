import numpy as np
import pytest
import torch

from modelfuse.merge.methods import magnitude_selection
from modelfuse.merge.methods.global_top_k import global_top_k
from modelfuse.merge.methods.magnitude_selection import (
    kth_largest,
    select_top_k,
    select_top_ks,
    top_k_mask,
)
from modelfuse.merge.methods.magnitude_threshold import TensorSelection, kept_count

from .._reference import top_k_positions


@pytest.mark.parametrize("n", [1, 7, 1000, 200_003])
def test_kth_largest_equals_the_sorted_order(n):
    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=g).abs()
    ordered = torch.sort(values, descending=True).values
    for k in sorted({1, max(1, n // 7), max(1, n // 2), n}):
        assert kth_largest(values, k) == float(ordered[k - 1])


def test_kth_largest_on_structured_data_falls_back_exactly():
    # A strided sample of a periodic tensor sees one value only: the bracket fails.
    values = torch.arange(300_000, dtype=torch.float32) % 65536
    ordered = torch.sort(values, descending=True).values
    for k in (1, 1234, 150_000, 299_999):
        assert kth_largest(values, k) == float(ordered[k - 1])


@pytest.mark.parametrize("k", [0, 1, 17, 250, 999, 1000])
def test_top_k_mask_keeps_exactly_k_with_index_order_ties(k):
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 20, (1000,), generator=g).float()  # many ties
    expected = np.zeros(1000, dtype=bool)
    expected[top_k_positions(values.numpy(), k)] = True
    assert np.array_equal(top_k_mask(values, k).numpy(), expected)


def test_global_top_k_equals_selection_on_the_concatenation():
    g = torch.Generator().manual_seed(1)
    sizes = [5, 400, 1, 2000, 333]
    chunks = [
        (f"t{i}", [torch.randint(0, 50, (s,), generator=g).float() / 8 for _ in range(3)])
        for i, s in enumerate(sizes)
    ]
    densities = [0.0, 0.25, 1.0]
    selections = global_top_k(lambda: iter(chunks), densities)
    for i, d in enumerate(densities):
        flat = torch.cat([c[1][i] for c in chunks]).numpy()
        k = int(d * flat.size)
        expected = np.zeros(flat.size, dtype=bool)
        expected[top_k_positions(flat, k)] = True
        got = torch.cat([selections[i].mask(c[1][i], c[0]) for c in chunks]).numpy()
        assert np.array_equal(got, expected)
        assert selections[i].kept == k and selections[i].total == flat.size


def test_chunked_selection_with_a_misleading_sample_falls_back_to_radix():
    g = torch.Generator().manual_seed(2)
    values = torch.randint(0, 1000, (300_000,), generator=g).float() / 64
    chunks = [values[i : i + 70_000] for i in range(0, 300_000, 70_000)]
    k = 123_456
    wrong_sample = torch.zeros(1000)  # brackets [0, 0]: the counting check must fail
    selection = select_top_k(lambda: iter(chunks), k, 300_000, wrong_sample)
    masker = selection.masker()
    mask = torch.cat([masker(c) for c in chunks]).numpy()
    expected = np.zeros(300_000, dtype=bool)
    expected[top_k_positions(values.numpy(), k)] = True
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize("quantized", [False, True])
def test_several_k_in_one_pass_over_chunks(quantized):
    g = torch.Generator().manual_seed(3)
    values = torch.randn(400_000, generator=g).abs()
    if quantized:
        values = values.to(torch.bfloat16).float()  # few distinct values: bit-range counting
    chunks = [values[i : i + 65_536] for i in range(0, 400_000, 65_536)]
    ks = [0, 1, 20_000, 333_333, 400_000]
    selections = select_top_ks(lambda: iter(chunks), ks, 400_000, values[::6])
    for k, selection in zip(ks, selections):
        masker = selection.masker()
        mask = torch.cat([masker(c) for c in chunks]).numpy()
        expected = np.zeros(400_000, dtype=bool)
        expected[top_k_positions(values.numpy(), k)] = True
        assert np.array_equal(mask, expected)


@pytest.mark.parametrize("k", [0, 1, 150, 333, 600, 1000])
def test_tensor_selection_applies_to_any_block_alone(k):
    """A whole tensor's selection, applied block by block (each block alone, knowing
    only its offset), keeps exactly the k largest, ties in index order, as a stable
    argsort does. Integer magnitudes tie everywhere, also across blocks."""
    g = torch.Generator().manual_seed(k)
    values = torch.randint(1, 7, (1000,), generator=g).float()
    expected = np.zeros(1000, dtype=bool)
    expected[top_k_positions(values.numpy(), k)] = True
    chunks = [values[a : a + 64] for a in range(0, 1000, 64)]
    threshold = select_top_k(lambda: chunks, k, 1000, values[::7].clone())
    selection = TensorSelection.of(threshold, lambda: chunks)
    for bounds in ([0, 1000], [0, 1, 2, 500, 999, 1000], list(range(0, 1001, 37)) + [1000]):
        kept = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            block = values[start:stop]
            pieces = [block[a : a + 5] for a in range(0, block.numel(), 5)]
            within = selection.within(start, block.numel(), lambda pieces=pieces: pieces)
            select = within.selector()
            kept += [select(piece) != 0 for piece in pieces]  # no zero values: 0 = dropped
        assert np.array_equal(torch.cat(kept).numpy(), expected)


@pytest.mark.parametrize("truthful", [True, False])
def test_a_guess_from_a_tied_sample_is_checked_by_counting(truthful):
    """A sample filled by one value makes that value the guess for the k-th largest. When
    it is right the counts give the exact selection (ties kept in index order); when the
    sample misleads, the counts say so and the selection is still exact."""
    g = torch.Generator().manual_seed(3)
    values = torch.randint(1, 9, (50_000,), generator=g).float()
    k = 21_000
    expected = np.zeros(values.numel(), dtype=bool)
    expected[top_k_positions(values.numpy(), k)] = True
    kth = float(np.sort(values.numpy())[::-1][k - 1])
    sample = torch.full((4096,), kth if truthful else kth + 0.5)
    sample[:1000] = 100.0  # the guessed value fills the sample's ranks around k / n
    tracker = magnitude_selection._tracker(magnitude_selection._Sample(sample), k, values.numel())
    assert isinstance(tracker, magnitude_selection._Guess)
    chunks = [values[a : a + 4096] for a in range(0, values.numel(), 4096)]
    selection = select_top_k(lambda: chunks, k, values.numel(), sample)
    assert selection.value == kth
    select = selection.selector()  # one selector: ties are kept in index order across chunks
    got = torch.cat([select(c) != 0 for c in chunks]).numpy()
    assert np.array_equal(got, expected)


def test_kept_count_is_mergekits_count():
    # mergekit 0.1.5 sparsify.magnitude: k = max(1, int(density * numel)); density <= 0: 0
    for density, n, k in [
        (0.5, 5, 2),
        (1e-9, 1000, 1),
        (0.0, 1000, 0),
        (0.999, 10, 9),
        (1.0, 7, 7),
        (0.3, 0, 0),
    ]:
        assert kept_count(density, n) == k


def test_global_top_k_keeps_one_entry_at_a_tiny_density():
    chunks = [("a", [torch.tensor([0.5, 4.0])]), ("b", [torch.tensor([1.0, 3.0, 2.0])])]
    [selection] = global_top_k(lambda: iter(chunks), [1e-6])
    assert (selection.kept, selection.value) == (1, 4.0)
    assert selection.mask(torch.tensor([0.5, 4.0]), "a").tolist() == [False, True]


@pytest.mark.parametrize("in_place", [False, True])
def test_float_masks_keep_the_same_entries_as_bool_masks(in_place):
    """Masks as 0/1 floats (sce's), also written over the magnitudes themselves, keep
    exactly the top k with ties in index order, across chunks that split the ties."""
    g = torch.Generator().manual_seed(4)
    values = torch.randint(0, 50, (300_000,), generator=g).float()  # ties everywhere
    chunks = [values[i : i + 70_000] for i in range(0, 300_000, 70_000)]
    k = 150_001
    selection = select_top_k(lambda: iter(chunks), k, 300_000, values[::7])
    masker = selection.masker(dtype=torch.float32)
    pieces = []
    for c in chunks:
        c = c.clone()
        pieces.append(masker(c, out=c) if in_place else masker(c))
    mask = torch.cat(pieces)
    assert mask.dtype == torch.float32
    expected = np.zeros(300_000, dtype=np.float32)
    expected[top_k_positions(values.numpy(), k)] = 1
    assert np.array_equal(mask.numpy(), expected)


@pytest.mark.parametrize("form", ["strided", "bfloat16", "autograd"])
def test_chunks_of_any_layout_select_as_their_float32_values(form):
    """The band (continuous values) and the guess (tied values) read each chunk through
    numpy: strided, low-precision and autograd chunks give the selection of their float32
    values, and the masks keep exactly the k largest (ties by position)."""
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(400_000, 2, generator=g).abs()
    for tied in (False, True):
        values = wide[:, 0].contiguous()
        if tied or form == "bfloat16":
            values = values.to(torch.bfloat16).float()
        plain = [values[i : i + 65_536] for i in range(0, 400_000, 65_536)]
        if form == "strided":
            source = wide.clone()
            source[:, 0] = values
            chunks = [source[i : i + 65_536, 0] for i in range(0, 400_000, 65_536)]
        elif form == "bfloat16":
            chunks = [c.to(torch.bfloat16) for c in plain]
        else:
            chunks = [c.clone().requires_grad_(True) for c in plain]
        k = 123_457
        expected = np.zeros(400_000, dtype=bool)
        expected[top_k_positions(values.numpy(), k)] = True
        selection = select_top_k(lambda chunks=chunks: iter(chunks), k, 400_000, values[::7])
        masker = selection.masker()
        mask = torch.cat([masker(c.detach().float()) for c in chunks]).numpy()
        assert np.array_equal(mask, expected)
