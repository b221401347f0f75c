import numpy as np
import pytest
import torch

from modelfuse.merge import merge_state_dicts
from modelfuse.merge.dare import DareLinearParameters, DareTiesParameters, dare_linear, dare_ties
from modelfuse.merge.execute import tensor_generator

from ._reference import combine


def _models(n, shape=(20, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n + 1)]


CHUNK = 2**18  # entries per generator in the documented stream


def _masks(shape, densities, seed, generator=None):
    """The drop masks written out: each model gets a seed s drawn from the tensor's
    generator; flat entries [j * 2**18, (j + 1) * 2**18) draw from a generator seeded by
    s + j, one uniform u per entry (float32), kept if u + d >= 1 (probability d)."""
    g = torch.Generator().manual_seed(seed) if generator is None else generator
    seeds = torch.randint(0, 2**62, (len(densities),), generator=g).tolist()
    size = int(np.prod(shape))
    masks = []
    for s, d in zip(seeds, densities):
        parts = [
            torch.rand(min(CHUNK, size - a), generator=torch.Generator().manual_seed(s + j))
            for j, a in enumerate(range(0, size, CHUNK))
        ]
        u = torch.cat(parts).reshape(shape).numpy()
        masks.append((u + np.float32(d) >= np.float32(1.0)).astype(np.float64))
    return masks


def _ref(base, tensors, w, d, seed, lam=1.0, normalize=False, consensus=None):
    b = base.double().numpy()
    masks = _masks(base.shape, d, seed)
    taus = [
        (t.double().numpy() - b) * m / di if di > 0 else 0 * b
        for t, m, di in zip(tensors, masks, d)
    ]
    return torch.from_numpy(combine(b, taus, w, lam, normalize, consensus)).float()


@pytest.mark.parametrize("normalize", [False, True])
def test_dare_linear_matches_formula_with_exact_rescale(normalize):
    base, *tensors = _models(3)
    w, d = [0.5, 1.0, -0.3], [0.1, 0.5, 0.8]
    out = dare_linear(
        tensors,
        base,
        weight=w,
        density=d,
        lambda_=1.2,
        normalize=normalize,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(out, _ref(base, tensors, w, d, 7, 1.2, normalize))


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_dare_ties_matches_formula(consensus):
    base, *tensors = _models(3)
    w, d = [1.0, 0.6, 0.8], [0.3, 0.5, 0.9]
    out = dare_ties(
        tensors,
        base,
        weight=w,
        density=d,
        consensus_method=consensus,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(out, _ref(base, tensors, w, d, 3, consensus=consensus))


def test_kept_entries_are_divided_by_exactly_the_keep_probability():
    base = torch.zeros(20000)
    out = dare_linear([torch.ones(20000)], base, density=0.3, random_seed=1)
    values = set(out.unique().tolist())
    assert values == {0.0, 1.0 / 0.3} or values == {0.0, float(torch.tensor(1.0) / 0.3)}
    kept = float((out != 0).float().mean())
    # Binomial(20000, 0.3): 6 standard deviations is 0.019.
    assert abs(kept - 0.3) < 0.02
    assert abs(float(out.mean()) - 1.0) < 0.07  # unbiased: E[m / d] = 1


def test_no_rescale_and_l1_rescale():
    base, a = _models(1)
    tau = (a - base).double().numpy()
    m = _masks(base.shape, [0.4], 5)[0]
    plain = dare_linear(
        [a], base, density=0.4, rescale=False, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(plain, base + torch.from_numpy(tau * m).float())
    l1 = dare_linear(
        [a], base, density=0.4, rescale_method="l1", generator=torch.Generator().manual_seed(5)
    )
    expected = tau * m * np.abs(tau).sum() / np.abs(tau * m).sum()
    torch.testing.assert_close(l1, base + torch.from_numpy(expected).float())


def test_density_zero_and_one():
    base, a, b = _models(2)
    torch.testing.assert_close(dare_linear([a, b], base, density=0.0), base)
    torch.testing.assert_close(dare_ties([a, b], base, density=0.0), base)
    torch.testing.assert_close(dare_linear([a, b], base, density=1.0), a + b - base)


def test_all_zero_task_vectors_and_one_model():
    base, a = _models(1)
    torch.testing.assert_close(dare_ties([base, base], base, density=0.5), base)
    out = dare_linear([a], base, density=0.5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, _ref(base, [a], [1.0], [0.5], 2))


def test_opposite_signs_everywhere():
    base, tau = ((t * 16).round() / 16 for t in _models(1))
    a, b = base + tau, base - tau
    # Same seed for both models' draws is not guaranteed, so use density 1 for the sign
    # case: linear cancels, TIES keeps the positive side.
    torch.testing.assert_close(dare_linear([a, b], base), base)
    torch.testing.assert_close(dare_ties([a, b], base), base + tau.abs())


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.w": torch.randn(16, 16, generator=g) for i in range(8)}


def test_same_seed_same_result_for_one_or_two_threads():
    base, models = _state(0), [_state(1), _state(2)]
    one = merge_state_dicts("dare_ties", models, base, density=0.5, random_seed=11, threads=1)
    two = merge_state_dicts("dare_ties", models, base, density=0.5, random_seed=11, threads=2)
    other = merge_state_dicts("dare_ties", models, base, density=0.5, random_seed=12, threads=2)
    for name in base:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=0)
        # Each tensor's draws come from the generator seeded by the seed and its name.
        g = tensor_generator(11, name)
        expected = _ref_with_generator(base[name], [m[name] for m in models], [0.5, 0.5], g)
        torch.testing.assert_close(one[name], expected)
    assert any(not torch.equal(one[k], other[k]) for k in base)


def _ref_with_generator(base, tensors, d, g):
    masks = _masks(base.shape, d, None, generator=g)
    b = base.double().numpy()
    taus = [(t.double().numpy() - b) * m / di for t, m, di in zip(tensors, masks, d)]
    return torch.from_numpy(combine(b, taus, [1, 1], 1.0, False, "sum")).float()


def test_defaults_are_mergekit_defaults():
    for cls in (DareLinearParameters, DareTiesParameters):
        p = cls()
        assert (p.normalize, p.rescale, p.lambda_, p.density) == (False, True, 1.0, 1.0)
    assert DareTiesParameters().consensus_method == "sum"
    assert "consensus_method" not in DareLinearParameters.model_fields


def test_large_tensor_is_chunked_without_changing_the_draws():
    g = torch.Generator().manual_seed(4)
    base, a, b = (torch.randn(700, 600, generator=g) for _ in range(3))  # 420000 entries
    out = dare_ties(
        [a, b],
        base,
        density=[0.3, 0.6],
        weight=[1.0, 0.5],
        normalize=True,
        generator=torch.Generator().manual_seed(9),
    )
    torch.testing.assert_close(
        out, _ref(base, [a, b], [1.0, 0.5], [0.3, 0.6], 9, normalize=True, consensus="sum")
    )


def test_a_block_of_rows_gets_the_whole_tensors_draws():
    """The engine merges large tensors in blocks of rows; with its offset, a block's result
    is the whole tensor's rows, across generator chunks (2**18 entries)."""
    g = torch.Generator().manual_seed(5)
    base, a, b = (torch.randn(700, 600, generator=g) for _ in range(3))
    kwargs = {"density": [0.4, 0.7], "random_seed": 3}
    whole = dare_ties([a, b], base, **kwargs)
    for start, stop in [(0, 1), (400, 700), (436, 437), (123, 555)]:
        block = dare_ties(
            [a[start:stop], b[start:stop]], base[start:stop], offset=start * 600, **kwargs
        )
        assert torch.equal(block, whole[start:stop])
    linear_whole = dare_linear([a, b], base, **kwargs)
    block = dare_linear([a[436:], b[436:]], base[436:], offset=436 * 600, **kwargs)
    assert torch.equal(block, linear_whole[436:])
