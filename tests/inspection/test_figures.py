"""tensor_figures against numpy formulas, and its sign conflict against modelfuse's TIES."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.inspection import TaskVectorFigures, tensor_figures
from modelfuse.merge.methods.ties import ties


def _top_k(values: np.ndarray, density: float) -> np.ndarray:
    """The max(1, int(d n)) largest magnitudes, ties to the lower index (a stable sort)."""
    n = values.size
    k = max(1, int(density * n))
    mask = np.zeros(n, dtype=bool)
    mask[np.argsort(-np.abs(values), kind="stable")[:k]] = True
    return mask


def _reference(models, base, weights, overlap, conflict, consensus="sum"):
    """Every figure written out in numpy, float64."""
    taus = np.stack([(m.double() - base.double()).numpy().ravel() for m in models])
    n_models = len(models)
    sets = [_top_k(t, overlap) & (t != 0) for t in taus]
    x = np.stack([weights[i] * taus[i] * _top_k(taus[i], conflict) for i in range(n_models)])
    tally = np.sign(x).sum(0) if consensus == "count" else x.sum(0)
    elected = np.where(tally >= 0, 1.0, -1.0)
    nonzero = (x != 0).sum(1)
    dropped = ((x != 0) & (np.sign(x) != elected)).sum(1)
    dots = taus @ taus.T
    delta = (np.asarray(weights)[:, None] * taus).sum(0)
    share = np.array([weights[i] * taus[i] @ delta for i in range(n_models)]) / (delta @ delta)
    norms = np.sqrt(np.diag(dots))
    jaccard = np.array([[(a & b).sum() / (a | b).sum() for b in sets] for a in sets])
    return {
        "norms": norms,
        "cosine": dots / np.outer(norms, norms),
        "nonzero": nonzero,
        "dropped": dropped,
        "conflict": dropped.sum() / nonzero.sum(),
        "jaccard": jaccard,
        "share": share,
    }


@pytest.fixture
def three_models():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(120, 33, generator=g)
    models = [base + s * torch.randn(120, 33, generator=g) for s in (0.1, 0.3, 0.05)]
    models[1][:7] = base[:7]  # rows where a task vector is zero
    models[2] = models[2] + 0.5 * (models[0] - base)  # correlated with the first
    return models, base


@pytest.mark.parametrize(
    ("overlap", "conflict", "consensus", "chunk"),
    [
        (0.2, 1.0, "sum", 1000),
        (0.3, 0.3, "sum", 97),
        (0.1, 0.5, "count", 4096),
        (1.0, 1.0, "sum", 512),
    ],
)
def test_figures_match_numpy(three_models, overlap, conflict, consensus, chunk):
    models, base = three_models
    weights = [1.0, 0.5, -0.7]
    found = tensor_figures(
        models,
        base,
        weight=weights,
        overlap_density=overlap,
        conflict_density=conflict,
        consensus_method=consensus,
        chunk=chunk,
    )
    ref = _reference(models, base, weights, overlap, conflict, consensus)
    np.testing.assert_allclose(found.norms, ref["norms"], rtol=1e-5)
    np.testing.assert_allclose(found.cosine, ref["cosine"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(found.nonzero, ref["nonzero"])
    np.testing.assert_array_equal(found.dropped, ref["dropped"])
    assert found.conflict == pytest.approx(ref["conflict"])
    np.testing.assert_allclose(found.overlap, ref["jaccard"], rtol=1e-12)
    np.testing.assert_allclose(found.share, ref["share"], rtol=1e-4)
    assert found.share.sum() == pytest.approx(1.0)
    if overlap != conflict:  # measured at the overlap density too
        trimmed = _reference(models, base, weights, overlap, overlap, consensus)
        assert found.trimmed_conflict == pytest.approx(trimmed["conflict"])
    else:
        assert found.trimmed_conflict is None


def test_ties_at_the_threshold_go_to_the_lower_index():
    # magnitudes 2, 2, 2, 1: a top-2 set keeps entries 0 and 1, as TIES' trim does
    base = torch.zeros(4)
    a = torch.tensor([2.0, -2.0, 2.0, 1.0])
    b = torch.tensor([0.0, 0.0, 2.0, 3.0])
    found = tensor_figures([a, b], base, overlap_density=0.5, conflict_density=0.5, chunk=3)
    assert found.shared.tolist() == [[2.0, 0.0], [0.0, 2.0]]  # a: {0, 1}; b: {2, 3}
    ref = _reference([a, b], base, [1.0, 1.0], 0.5, 0.5)
    np.testing.assert_array_equal(found.dropped, ref["dropped"])


@pytest.mark.parametrize("density", [1.0, 0.4])
@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_sign_conflict_is_what_ties_election_drops(density, consensus):
    """The entries counted as rejected are exactly those modelfuse's TIES leaves out.

    With normalize off and lambda 1, TIES returns base + sum_i x_i [sign x_i = elected]: the sum
    of the weighted trimmed task vectors over the entries kept. Rebuilt from the entries
    tensor_figures counts as agreeing, it must equal TIES' output, and the rejected count must
    equal the non-zero entries TIES left out.
    """
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 16, generator=g)
    models = [base + torch.randn(64, 16, generator=g) * s for s in (1.0, 0.7, 1.3)]
    weights = [1.0, 0.6, 1.4]
    merged = (
        ties(
            models,
            base,
            weight=weights,
            density=density,
            normalize=False,
            consensus_method=consensus,
        )
        - base
    )
    taus = [(m - base).numpy().ravel().astype(np.float64) for m in models]
    x = [w * t * _top_k(t, density) for w, t in zip(weights, taus)]
    # which entries ties kept: the sign group (+ or -) whose sum is ties' output
    positive = sum(np.clip(v, 0, None) for v in x)
    negative = sum(np.clip(v, None, 0) for v in x)
    out = merged.numpy().ravel().astype(np.float64)
    elected = np.where(
        np.isclose(out, positive, atol=1e-5) & ~np.isclose(positive, 0),
        1.0,
        np.where(np.isclose(out, negative, atol=1e-5) & ~np.isclose(negative, 0), -1.0, 0.0),
    )
    kept = [(v != 0) & (np.sign(v) == elected) for v in x]
    ties_dropped = np.array([((v != 0) & ~k).sum() for v, k in zip(x, kept)])
    found = tensor_figures(
        models,
        base,
        weight=weights,
        conflict_density=density,
        consensus_method=consensus,
    )
    np.testing.assert_array_equal(found.dropped, ties_dropped)
    np.testing.assert_array_equal(found.nonzero, [(v != 0).sum() for v in x])
    assert 0 < found.conflict < 0.5


def test_sums_add_up_over_tensors(three_models):
    models, base = three_models
    whole = tensor_figures(models, base, overlap_density=1.0)
    halves = [
        tensor_figures([m[:60] for m in models], base[:60], overlap_density=1.0),
        tensor_figures([m[60:] for m in models], base[60:], overlap_density=1.0),
    ]
    total = TaskVectorFigures.zeros(3) + halves[0] + halves[1]
    assert total.tensors == 2 and total.entries == whole.entries
    np.testing.assert_allclose(total.dots, whole.dots, rtol=1e-5)
    np.testing.assert_array_equal(total.dropped, whole.dropped)


def test_inputs_are_not_modified_and_bfloat16_is_read_as_float32():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(50, 8, generator=g).bfloat16()
    models = [(base.float() + 0.01 * torch.randn(50, 8, generator=g)).bfloat16() for _ in range(2)]
    copies = [m.clone() for m in [base, *models]]
    found = tensor_figures(models, base)
    for before, after in zip(copies, [base, *models]):
        assert torch.equal(before, after)
    ref = _reference([m.float() for m in models], base.float(), [1.0, 1.0], 0.2, 1.0)
    np.testing.assert_allclose(found.norms, ref["norms"], rtol=1e-5)


def test_zero_task_vectors_give_nan_not_errors():
    base = torch.ones(10)
    found = tensor_figures([base.clone(), base + 1], base)
    assert np.isnan(found.cosine[0, 1]) and found.norms[0] == 0
    assert found.nonzero.tolist() == [0.0, 10.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overlap_density": 0.0}, "overlap_density: expected a density in (0, 1]"),
        ({"conflict_density": 1.5}, "conflict_density: expected a density in (0, 1]"),
        ({"weight": [1.0]}, "weight: 1 values for 2 models"),
        ({"consensus_method": "vote"}, "consensus_method: unknown value 'vote'; valid: sum, count"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    base = torch.zeros(4)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tensor_figures([base + 1, base - 1], base, **kwargs)


def test_a_sample_measures_the_sign_figures_on_strided_entries_only():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(300, 50, generator=g)
    models = [base + torch.randn(300, 50, generator=g) for _ in range(2)]
    exact = tensor_figures(models, base, conflict_density=0.5, overlap_density=0.3)
    sampled = tensor_figures(models, base, conflict_density=0.5, overlap_density=0.3, sample=1000)
    stride = -(-15000 // 1000)
    on_sample = tensor_figures(
        [m.reshape(-1)[::stride] for m in models],
        base.reshape(-1)[::stride],
        conflict_density=0.5,
        overlap_density=0.3,
    )
    np.testing.assert_allclose(sampled.dots, exact.dots)  # every entry
    assert sampled.entries == 15000 and sampled.signed_entries == on_sample.entries == 1000
    np.testing.assert_array_equal(sampled.dropped, on_sample.dropped)
    np.testing.assert_array_equal(sampled.shared, on_sample.shared)
    assert sampled.conflict == pytest.approx(exact.conflict, abs=0.03)
    assert sampled.mean_overlap == pytest.approx(exact.mean_overlap, abs=0.03)
    assert tensor_figures(models, base, sample=20000).signed_entries == 15000


def test_many_models_match_numpy():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(40, 25, generator=g)
    models = [base + torch.randn(40, 25, generator=g) * (0.1 + i / 10) for i in range(5)]
    weights = [1.0, 0.5, 2.0, -1.0, 0.3]
    found = tensor_figures(models, base, weight=weights, overlap_density=0.25, chunk=300)
    ref = _reference(models, base, weights, 0.25, 1.0)
    np.testing.assert_allclose(found.cosine, ref["cosine"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(found.overlap, ref["jaccard"], rtol=1e-12)
    np.testing.assert_array_equal(found.dropped, ref["dropped"])
    np.testing.assert_allclose(found.share, ref["share"], rtol=1e-4)


def test_a_large_sample_gives_the_figures_of_its_entries_exactly():
    """A sample above the selection's own sampling size (2**17 entries) is measured on the
    task vectors picked while the dot products are summed: the same sets and elections as
    the strided entries measured whole, in bfloat16 with tied magnitudes."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(1200, 500, generator=g).to(torch.bfloat16)
    models = [
        (base.float() + torch.randn(1200, 500, generator=g).mul_(0.01)).to(torch.bfloat16)
        for _ in range(2)
    ]
    settings = {"conflict_density": 0.5, "overlap_density": 0.2, "weight": [1.0, 0.7]}
    sampled = tensor_figures(models, base, sample=200_000, **settings)
    stride = -(-600_000 // 200_000)
    on_sample = tensor_figures(
        [m.reshape(-1)[::stride] for m in models], base.reshape(-1)[::stride], **settings
    )
    assert sampled.signed_entries == on_sample.entries == 200_000
    np.testing.assert_array_equal(sampled.shared, on_sample.shared)
    np.testing.assert_array_equal(sampled.nonzero, on_sample.nonzero)
    np.testing.assert_array_equal(sampled.dropped, on_sample.dropped)
    np.testing.assert_array_equal(sampled.trimmed_dropped, on_sample.trimmed_dropped)
    # every entry for the dot products, against numpy in float64
    taus = np.stack([(m.double() - base.double()).numpy().ravel() for m in models])
    np.testing.assert_allclose(sampled.dots, taus @ taus.T, rtol=1e-5)


@pytest.mark.parametrize("n_models", [1, 2, 3, 5])
def test_streamed_dot_products_match_numpy(n_models):
    from modelfuse.inspection.figures import streamed_figures

    g = torch.Generator().manual_seed(12)
    base = torch.randn(70, 30, generator=g)
    models = [base + torch.randn(70, 30, generator=g) for _ in range(n_models)]
    blocks = [([m[a:b] for m in models], base[a:b]) for a, b in [(0, 33), (33, 34), (34, 70)]]
    found = streamed_figures(blocks, 2100, n_models, sample=500, chunk=256)  # partial chunks
    taus = np.stack([(m.double() - base.double()).numpy().ravel() for m in models])
    np.testing.assert_allclose(found.dots, taus @ taus.T, rtol=1e-5)
    if n_models <= 3:  # one dot per pair (a matrix product for more)
        np.testing.assert_array_equal(found.dots, found.dots.T)
    assert found.signed_entries == 2100 // 5  # every 5th entry: ceil(2100 / 500) = 5


def test_blocks_of_another_size_than_announced_are_refused():
    from modelfuse.inspection.figures import streamed_figures

    base, model = torch.zeros(10), torch.ones(10)
    with pytest.raises(ValueError, match="more than 8 entries"):
        streamed_figures([([model[:5]], base[:5]), ([model[5:]], base[5:])], 8, 1, sample=4)
    with pytest.raises(ValueError, match="hold 10 entries, expected 12"):
        streamed_figures([([model], base)], 12, 1, sample=4)


def test_a_block_wider_than_a_conversion_piece_is_measured_in_pieces():
    from modelfuse.inspection.figures import CHUNK, streamed_figures

    g = torch.Generator().manual_seed(13)
    n = CHUNK + 70_000  # one block (a single wide row), converted in two pieces
    base = torch.randn(n, generator=g)
    models = [base + torch.randn(n, generator=g) for _ in range(2)]
    found = streamed_figures([(models, base)], n, 2, sample=50_000, overlap_density=0.3)
    stride = -(-n // 50_000)
    on_sample = tensor_figures([m[::stride] for m in models], base[::stride], overlap_density=0.3)
    np.testing.assert_array_equal(found.shared, on_sample.shared)
    np.testing.assert_array_equal(found.dropped, on_sample.dropped)
    taus = np.stack([(m.double() - base.double()).numpy() for m in models])
    np.testing.assert_allclose(found.dots, taus @ taus.T, rtol=1e-5)
