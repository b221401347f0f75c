import numpy as np
import pytest
import torch

from modelfuse.merge import merge_state_dicts
from modelfuse.merge.execute import tensor_generator
from modelfuse.merge.methods.dare import (
    DareLinearParameters,
    DareTiesParameters,
    dare_linear,
    dare_ties,
)
from modelfuse.merge.methods.rescaling import rescale_factors

from .._reference import combine, uniforms


def _models(n, shape=(20, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n + 1)]




def _masks(shape, densities, seed, generator=None):
    """The drop masks written out: each model gets a seed s drawn from the tensor's
    generator; flat entries [j * 2**18, (j + 1) * 2**18) draw from numpy's PCG64 seeded
    by s + j, one uniform u per entry (float32), kept if u + d >= 1 (probability d)."""
    g = torch.Generator().manual_seed(seed) if generator is None else generator
    seeds = torch.randint(0, 2**62, (len(densities),), generator=g).tolist()
    size = int(np.prod(shape))
    masks = []
    for s, d in zip(seeds, densities):
        u = uniforms(size, s).reshape(shape)
        masks.append((u + np.float32(d) >= np.float32(1.0)).astype(np.float64))
    return masks


def _rescaled(tau, m, d, how):
    """mergekit 0.1.5's rescale ('l1': the kept entries times ||tau||_1 / ||m tau||_1, no
    rescale when either is below 1e-7), the paper's ('exact': divided by d), or none."""
    if d >= 1:
        return tau
    kept = tau * m
    if how == "exact":
        return kept / d if d > 0 else kept
    if how == "l1":
        before, after = np.abs(tau).sum(), np.abs(kept).sum()
        return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept
    return kept


def _ref(base, tensors, w, d, seed, lam=1.0, normalize=False, consensus=None, how="l1"):
    b = base.double().numpy()
    masks = _masks(base.shape, d, seed)
    taus = [_rescaled(t.double().numpy() - b, m, di, how) for t, m, di in zip(tensors, masks, d)]
    return torch.from_numpy(combine(b, taus, w, lam, normalize, consensus)).float()


@pytest.mark.parametrize("how", ["l1", "exact"])
@pytest.mark.parametrize("normalize", [False, True])
def test_dare_linear_matches_formula(normalize, how):
    base, *tensors = _models(3)
    w, d = [0.5, 1.0, -0.3], [0.1, 0.5, 0.8]
    out = dare_linear(
        tensors,
        base,
        weight=w,
        density=d,
        lambda_=1.2,
        normalize=normalize,
        rescale_method=how,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(out, _ref(base, tensors, w, d, 7, 1.2, normalize, how=how))


@pytest.mark.parametrize("how", ["l1", "exact"])
@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_dare_ties_matches_formula(consensus, how):
    base, *tensors = _models(3)
    w, d = [1.0, 0.6, 0.8], [0.3, 0.5, 0.9]
    out = dare_ties(
        tensors,
        base,
        weight=w,
        density=d,
        consensus_method=consensus,
        rescale_method=how,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(out, _ref(base, tensors, w, d, 3, consensus=consensus, how=how))


def test_default_rescale_keeps_each_task_vectors_l1_norm_as_mergekit():
    """mergekit 0.1.5 (sparsify.bernoulli, rescale_norm=l1 when rescale is true, the
    default of dare_linear and dare_ties): sum |kept| equals sum |tau| per tensor."""
    base, a, b = _models(2)
    g = torch.Generator().manual_seed(8)
    dropped = dare_linear([a], base, density=0.3, rescale=False, generator=g)
    kept = int((dropped != base).sum())
    out = dare_linear([a], base, density=0.3, generator=torch.Generator().manual_seed(8))
    tau = (a - base).double()
    assert 0 < kept < tau.numel()
    assert abs(float((out - base).double().abs().sum() / tau.abs().sum()) - 1) < 1e-6
    # the same through a configuration, where rescale and rescale_method are not given
    merged = merge_state_dicts("dare_linear", [{"w": a}], {"w": base}, density=0.3)
    assert abs(float((merged["w"] - base).double().abs().sum() / tau.abs().sum()) - 1) < 1e-6
    for cls in (DareLinearParameters, DareTiesParameters):
        assert cls().rescale_method == "l1"


def test_l1_rescale_below_mergekits_epsilon_is_no_rescale():
    """mergekit leaves the kept entries as they are when ||tau||_1 or ||m tau||_1 < 1e-7."""
    base, a = _models(1)
    torch.testing.assert_close(dare_linear([base.clone()], base, density=0.5), base)
    zero = torch.zeros(600)
    signs = torch.sign(a.reshape(-1) - base.reshape(-1))
    for size, rescaled in [(1e-10, False), (1e-9, True)]:  # ||tau||_1 = 6e-8, 6e-7
        model = size * signs

        def run(model=model, **kwargs):
            return dare_linear(
                [model], zero, density=0.5, generator=torch.Generator().manual_seed(1), **kwargs
            )

        plain = run(rescale=False)
        kept = int((plain != 0).sum())
        assert 200 < kept < 400
        expected = plain * (600 / kept) if rescaled else plain
        torch.testing.assert_close(run(), expected)


def test_density_one_is_never_rescaled_and_tiny_densities_may_keep_nothing():
    """Bernoulli drops round nothing (mergekit 0.1.5 draws torch.bernoulli(density)): a
    density of 1e-6 keeps no entry of 600 here, and an all-zero kept vector is left alone."""
    base, a = _models(1)
    torch.testing.assert_close(dare_linear([a], base, density=1.0), a)
    for how in ("l1", "exact"):
        out = dare_linear([a], base, density=1e-6, rescale_method=how, random_seed=3)
        torch.testing.assert_close(out, base)


def test_kept_entries_are_divided_by_exactly_the_keep_probability():
    base = torch.zeros(20000)
    out = dare_linear([torch.ones(20000)], base, density=0.3, random_seed=1, rescale_method="exact")
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
    taus = [_rescaled(t.double().numpy() - b, m, di, "l1") for t, m, di in zip(tensors, masks, d)]
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
    kwargs = {"density": [0.4, 0.7], "random_seed": 3, "rescale_method": "exact"}
    whole = dare_ties([a, b], base, **kwargs)
    for start, stop in [(0, 1), (400, 700), (436, 437), (123, 555)]:
        block = dare_ties(
            [a[start:stop], b[start:stop]], base[start:stop], offset=start * 600, **kwargs
        )
        assert torch.equal(block, whole[start:stop])
    linear_whole = dare_linear([a, b], base, **kwargs)
    block = dare_linear([a[436:], b[436:]], base[436:], offset=436 * 600, **kwargs)
    assert torch.equal(block, linear_whole[436:])
    # with the default L1 rescale a block needs the whole tensor's factors
    factors = rescale_factors(
        [a, b], base, density=[0.4, 0.7], generator=torch.Generator().manual_seed(3)
    )
    masks = _masks(base.shape, [0.4, 0.7], 3)
    for factor, packed, model, m in zip(factors.factors, factors.masks, (a, b), masks):
        tau = (model - base).double().numpy()
        # the norms are float32 sums of rows of 2048 entries, added in float64: about 1e-7
        assert abs(factor - np.abs(tau).sum() / np.abs(tau * m).sum()) < 1e-6 * factor
        # the masks the factors were found with, one bit per entry, for the blocks to apply
        assert packed.nbytes == (700 * 600 + 7) // 8
        assert np.array_equal(np.unpackbits(packed)[: 700 * 600], m.reshape(-1))
    kwargs["rescale_method"] = "l1"
    whole = dare_linear([a, b], base, **kwargs)
    for start in (436, 1, 0):  # unaligned offsets: test_row_blocks_give_the_same_bytes...
        block = dare_linear(
            [a[start:], b[start:]],
            base[start:],
            offset=start * 600,
            rescale_factors=factors,
            **kwargs,
        )
        assert torch.equal(block, whole[start:])
        # plain factors (no masks): the block draws its masks again, the same ones
        plain = dare_linear(
            [a[start:], b[start:]],
            base[start:],
            offset=start * 600,
            rescale_factors=list(factors.factors),
            **kwargs,
        )
        assert torch.equal(plain, whole[start:])
    assert not torch.equal(whole, linear_whole)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("how", ["l1", "exact"])
def test_row_blocks_give_the_same_bytes_as_the_whole_tensor(monkeypatch, method, how):
    """The engine merges large tensors in blocks of rows: with the L1 rescale each tensor's
    factors are its reduction (one pass over the whole tensor, with the merge's masks),
    then every block is merged alone; the exact rescale needs no reduction. Bitwise the
    whole tensor's result, from one thread or two, and the formula written out."""
    import modelfuse.merge.execute as execute
    import modelfuse.merge.schedule as schedule

    g = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(12, 5, generator=g), "b": torch.randn(30, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in "ab"]
    params = {"density": 0.4, "random_seed": 5, "rescale_method": how}
    whole = merge_state_dicts(method, models, base, **params)
    consensus = "sum" if method == "dare_ties" else None
    for name in base:
        masks = _masks(base[name].shape, [0.4, 0.4], None, generator=tensor_generator(5, name))
        b = base[name].double().numpy()
        taus = [
            _rescaled(m[name].double().numpy() - b, mask, d, how)
            for m, mask, d in zip(models, masks, [0.4, 0.4])
        ]
        expected = torch.from_numpy(combine(b, taus, [1, 1], 1.0, False, consensus)).float()
        torch.testing.assert_close(whole[name], expected)
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 5)  # blocks of one row
    reductions, blocks = [], []
    reduce, call = execute._reduce, execute._call
    monkeypatch.setattr(execute, "_reduce", lambda *a: reductions.append(a[1].name) or reduce(*a))
    monkeypatch.setattr(execute, "_call", lambda *a: blocks.append(a[3]) or call(*a))
    for threads in (1, 2):
        merged = merge_state_dicts(method, models, base, threads=threads, **params)
        for name in whole:
            assert torch.equal(merged[name], whole[name])
    assert sum(rows is not None for rows in blocks) == 2 * (12 + 6)
    assert sorted(reductions) == (["b", "b", "w", "w"] if how == "l1" else [])


def test_the_l1_rescale_draws_each_mask_once(monkeypatch):
    """The norm pass draws the masks and keeps them (one bit per entry) for the merge
    pass: as many draws as the exact rescale, and the same masks (the formula above)."""
    import modelfuse.merge.methods.sparsification as sparsification

    calls = []
    draw = sparsification.uniform_draws
    monkeypatch.setattr(sparsification, "uniform_draws", lambda *a: calls.append(a[1]) or draw(*a))
    monkeypatch.setattr(sparsification, "_CHUNK", 64)  # 600 entries: 10 chunks per model
    base, a, b = _models(2)
    for how in ("exact", "l1"):
        calls.clear()
        out = dare_ties(
            [a, b],
            base,
            density=[0.3, 0.6],
            rescale_method=how,
            generator=torch.Generator().manual_seed(2),
        )
        assert len(calls) == 2 * 10
        expected = _ref(base, [a, b], [1, 1], [0.3, 0.6], 2, consensus="sum", how=how)
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("consensus", [None, "sum"])
def test_held_chunks_and_recorded_masks_give_the_same_bytes(monkeypatch, consensus):
    """The norm pass holds what each chunk keeps for the merge pass when the tensor's task
    vectors fit in KEEP_BYTES, and records the drop masks (one bit per entry) otherwise:
    bitwise the same result, the formula, and no draw repeated by the merge pass."""
    import modelfuse.merge.methods.rescaling as rescaling
    import modelfuse.merge.methods.sparsification as sparsification

    calls = []
    draw = sparsification.uniform_draws
    monkeypatch.setattr(sparsification, "uniform_draws", lambda *a: calls.append(a[1]) or draw(*a))
    monkeypatch.setattr(sparsification, "_CHUNK", 64)  # 600 entries: 10 chunks per model
    base, a, b = _models(2)
    merge = dare_linear if consensus is None else dare_ties
    results = []
    for keep_bytes in (rescaling.KEEP_BYTES, 0):
        monkeypatch.setattr(rescaling, "KEEP_BYTES", keep_bytes)
        calls.clear()
        results.append(merge([a, b], base, density=[0.3, 0.6], weight=[0.5, 2.0],
                             generator=torch.Generator().manual_seed(4)))
        assert len(calls) == 2 * 10
    assert torch.equal(results[0], results[1])
    expected = _ref(base, [a, b], [0.5, 2.0], [0.3, 0.6], 4, consensus=consensus, how="l1")
    torch.testing.assert_close(results[0], expected)


def test_a_mergekit_dare_file_gives_mergekits_rescale(tmp_path):
    """A mergekit dare_ties file (weights, densities, rescale left at mergekit's default)
    gives mergekit 0.1.5's formula: each task vector's kept entries times its tensor's
    ||tau||_1 / ||kept||_1, then the sign election without normalize."""
    from safetensors.torch import load_file, save_file

    import modelfuse

    g = torch.Generator().manual_seed(9)
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.norm.weight"]
    shapes = [(10, 4), (4, 4), (4,)]
    states = [{n: torch.randn(s, generator=g) for n, s in zip(names, shapes)} for _ in range(3)]
    for i, state in enumerate(states):
        save_file(state, tmp_path / f"m{i}.safetensors")
    config = tmp_path / "dare.yaml"
    config.write_text(
        "merge_method: dare_ties\n"
        f"base_model: {tmp_path / 'm0.safetensors'}\n"
        "models:\n"
        f"  - model: {tmp_path / 'm1.safetensors'}\n"
        "    parameters: {weight: 0.7, density: 0.5}\n"
        f"  - model: {tmp_path / 'm2.safetensors'}\n"
        "    parameters: {weight: 0.4, density: 6e-1}\n"
        "dtype: float32\n"
    )
    modelfuse.merge(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for name in names:
        base = states[0][name]
        masks = _masks(base.shape, [0.5, 0.6], None, generator=tensor_generator(0, name))
        b = base.double().numpy()
        taus = [
            _rescaled(s[name].double().numpy() - b, m, d, "l1")
            for s, m, d in zip(states[1:], masks, [0.5, 0.6])
        ]
        expected = combine(b, taus, [0.7, 0.4], 1.0, False, "sum")
        torch.testing.assert_close(merged[name], torch.from_numpy(expected).float())
