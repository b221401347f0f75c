import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.engine import plan_merge
from modelfuse.merge.execute import tensor_generator
from modelfuse.merge.methods.della import (
    DellaLinearParameters,
    DellaParameters,
    della,
    della_linear,
    della_rescale_factors,
)

from .._reference import combine, uniforms


def _probabilities(tau, d, e):
    """mergekit 0.1.5's della_magprune, written out: ranks of |tau| along the second
    dimension (a 1-D tensor is one row), 0 for the smallest (ties by position), then
    p = (d - e) + 2 e r / (m - 1), in float32."""
    view = np.abs(tau).reshape(-1) if tau.ndim < 2 else np.moveaxis(np.abs(tau), 1, -1)
    order = np.argsort(view, axis=-1, kind="stable")
    ranks = np.argsort(order, axis=-1, kind="stable").astype(np.float32)
    m = view.shape[-1]
    position = ranks / np.float32(m - 1) if m > 1 else np.full_like(ranks, 0.5)
    p = position * np.float32(2) * np.float32(e) + np.float32(d - e)
    return p.reshape(-1) if tau.ndim < 2 else np.moveaxis(p, -1, 1)


def _kept(tau, d, e, u):
    """The documented draw, written out: with a = d - e, b = d + e and m entries per
    row, the draw u picks j = ceil((m - 1)(1 - u - a) / (b - a)) - 1; the entry is
    kept when j < 0, dropped when j >= m, and otherwise kept when entry j of its row
    (itself included) ranks below it (smaller magnitude, or equal and earlier).
    When b + (b - a) / (m - 1) > 1 the rows are ranked: kept when u + p >= 1.
    Rows along the second dimension; a 1-D tensor is one row."""
    mag = np.abs(tau).astype(np.float32)
    rows = mag.reshape(1, -1) if tau.ndim < 2 else np.moveaxis(mag, 1, -1)
    draws = u.reshape(1, -1) if tau.ndim < 2 else np.moveaxis(u, 1, -1)
    m = rows.shape[-1]
    if d + e + 2 * e / (m - 1) > 1:
        return u + _probabilities(tau, d, e) >= np.float32(1)
    scale = (m - 1) / (2 * e)
    pick = np.ceil(draws * np.float32(-scale) + np.float32((1 - (d - e)) * scale)) - 1
    keep = np.zeros(rows.shape, dtype=bool)
    for index in np.ndindex(rows.shape):
        *row, i = index
        j = pick[index]
        if j < 0:
            keep[index] = True
        elif j < m:
            mine, theirs = rows[index], rows[(*row, int(j))]
            keep[index] = theirs < mine or (theirs == mine and j < i)
    keep = keep.reshape(-1) if tau.ndim < 2 else np.moveaxis(keep, -1, 1)
    return keep.reshape(tau.shape)


def _sparsified(tau, d, e, seed, how):
    if d >= 1:
        return tau
    u = uniforms(tau.size, seed).reshape(tau.shape)
    keep = _kept(tau.astype(np.float32), d, e, u).astype(np.float64)
    kept = tau * keep
    if how == "exact":
        return kept / _probabilities(tau.astype(np.float32), d, e).astype(np.float64)
    if how == "l1":
        before, after = np.abs(tau).sum(), np.abs(kept).sum()
        return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept
    return kept


def _ref(base, tensors, w, d, e, generator, how="l1", lam=1.0, normalize=False, consensus=None):
    seeds = torch.randint(0, 2**62, (len(tensors),), generator=generator).tolist()
    b = base.double().numpy()
    taus = [
        _sparsified(t.double().numpy() - b, di, ei, s, how)
        for t, di, ei, s in zip(tensors, d, e, seeds)
    ]
    return torch.from_numpy(combine(b, taus, w, lam, normalize, consensus)).float()


def _models(n, shape=(20, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n + 1)]


@pytest.mark.parametrize("shape", [(20, 30), (90,), (4, 6, 5)])
@pytest.mark.parametrize("how", ["l1", "exact", "none"])
def test_della_linear_matches_formula(shape, how):
    base, *tensors = _models(3, shape)
    w, d, e = [0.5, 1.0, -0.3], [0.2, 0.5, 0.8], [0.1, 0.3, 0.15]
    rescale = {"rescale": False} if how == "none" else {"rescale_method": how}
    out = della_linear(
        tensors,
        base,
        weight=w,
        density=d,
        epsilon=e,
        lambda_=1.3,
        generator=torch.Generator().manual_seed(7),
        **rescale,
    )
    expected = _ref(base, tensors, w, d, e, torch.Generator().manual_seed(7), how, lam=1.3)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("how", ["l1", "exact"])
@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_della_matches_formula(consensus, how, normalize):
    base, *tensors = _models(3)
    w, d = [1.0, 0.6, 0.8], [0.3, 0.5, 0.7]
    out = della(
        tensors,
        base,
        weight=w,
        density=d,
        epsilon=0.2,
        normalize=normalize,
        consensus_method=consensus,
        rescale_method=how,
        generator=torch.Generator().manual_seed(3),
    )
    expected = _ref(
        base,
        tensors,
        w,
        d,
        [0.2] * 3,
        torch.Generator().manual_seed(3),
        how,
        normalize=normalize,
        consensus=consensus,
    )
    torch.testing.assert_close(out, expected)


def test_keep_rates_rise_with_the_rank_as_mergekit_computes_them():
    """In each row, ranks 0 .. m-1 are kept with probabilities d - e .. d + e: with one
    value repeated down many rows, the kept fraction per column follows the line."""
    ramp = torch.arange(1, 11, dtype=torch.float32).repeat(20000, 1)  # rank = column
    out = della_linear([ramp], torch.zeros(20000, 10), density=0.5, epsilon=0.4, rescale=False)
    rates = (out != 0).double().mean(0).numpy()
    expected = 0.1 + 0.8 * np.arange(10) / 9
    # Binomial(20000, p): 6 standard deviations is at most 0.022
    assert np.abs(rates - expected).max() < 0.022


def test_exact_rescale_is_unbiased_entry_by_entry():
    ramp = torch.arange(1, 11, dtype=torch.float32).repeat(20000, 1)
    out = della_linear(
        [ramp],
        torch.zeros(20000, 10),
        density=0.5,
        epsilon=0.4,
        rescale_method="exact",
        random_seed=2,
    )
    # kept entry j is j+1 over its probability; the column means are j+1 (E[m / p] = 1)
    means = out.double().mean(0).numpy()
    assert np.abs(means / np.arange(1, 11) - 1).max() < 0.1


def test_large_tensor_chunks_keep_whole_rows_and_the_draws():
    """420000 entries in rows of 700: chunks hold whole rows, across generator chunks."""
    g = torch.Generator().manual_seed(4)
    base, a, b = (torch.randn(600, 700, generator=g) for _ in range(3))
    out = della(
        [a, b],
        base,
        density=[0.3, 0.6],
        weight=[1.0, 0.5],
        generator=torch.Generator().manual_seed(9),
    )
    expected = _ref(
        base,
        [a, b],
        [1.0, 0.5],
        [0.3, 0.6],
        [0.15, 0.15],
        torch.Generator().manual_seed(9),
        normalize=True,
        consensus="sum",
    )
    torch.testing.assert_close(out, expected)


def test_a_block_of_rows_with_the_whole_tensors_factors_is_the_whole_tensors_rows():
    g = torch.Generator().manual_seed(5)
    base, a, b = (torch.randn(300, 40, generator=g) for _ in range(3))
    kwargs = {"density": [0.4, 0.7], "random_seed": 3}
    factors = della_rescale_factors([a, b], base, **kwargs, name="w")
    assert all(mask is not None for mask in factors.masks)
    whole = della([a, b], base, generator=tensor_generator(3, "w"), **kwargs)
    expected = _ref(
        base,
        [a, b],
        [1, 1],
        [0.4, 0.7],
        [0.15] * 2,
        tensor_generator(3, "w"),
        normalize=True,
        consensus="sum",
    )
    torch.testing.assert_close(whole, expected)
    for start in (0, 1, 123, 299):
        block = della(
            [a[start:], b[start:]],
            base[start:],
            offset=start * 40,
            rescale_factors=factors,
            generator=tensor_generator(3, "w"),
            **kwargs,
        )
        assert torch.equal(block, whole[start:])


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("how", ["l1", "exact"])
def test_engine_row_blocks_give_the_whole_tensors_bytes(monkeypatch, method, how):
    """With the L1 rescale the engine reduces each tensor (its masks, drawn from the whole
    tensor's rows) and merges blocks of rows; with the exact rescale it merges whole."""
    import modelfuse.merge.execute as execute
    import modelfuse.merge.schedule as schedule

    g = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(12, 5, generator=g), "b": torch.randn(30, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in "ab"]
    params = {"density": 0.4, "random_seed": 5, "rescale_method": how}
    whole = merge_state_dicts(method, models, base, **params)
    consensus = "sum" if method == "della" else None
    for name in base:
        expected = _ref(
            base[name],
            [m[name] for m in models],
            [1, 1],
            [0.4, 0.4],
            [0.15] * 2,
            tensor_generator(5, name),
            how,
            normalize=method == "della",
            consensus=consensus,
        )
        torch.testing.assert_close(whole[name], expected)
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 5)  # blocks of one row (of 5 entries of b)
    reductions, blocks = [], []
    reduce, call = execute._reduce, execute._call
    monkeypatch.setattr(execute, "_reduce", lambda *a: reductions.append(a[1].name) or reduce(*a))
    monkeypatch.setattr(execute, "_call", lambda *a: blocks.append(a[3]) or call(*a))
    for threads in (1, 2):
        merged = merge_state_dicts(method, models, base, threads=threads, **params)
        for name in whole:
            assert torch.equal(merged[name], whole[name])
    split = how == "l1"
    assert sum(rows is not None for rows in blocks) == (2 * (12 + 6) if split else 0)
    assert sorted(reductions) == (["b", "b", "w", "w"] if split else [])


def test_density_one_zero_and_ties_election_without_drops():
    base, a, b = _models(2)
    torch.testing.assert_close(della_linear([a, b], base), a + b - base)
    torch.testing.assert_close(della_linear([a, b], base, density=0.0), base)
    torch.testing.assert_close(della([a, b], base, density=0.0), base)
    x = [(a - base).double().numpy(), (b - base).double().numpy()]
    expected = combine(base.double().numpy(), x, [1, 1], 1.0, True, "sum")
    torch.testing.assert_close(della([a, b], base), torch.from_numpy(expected).float())


def test_a_row_of_one_entry_is_kept_with_probability_density():
    out = della_linear(
        [torch.ones(20000, 1)],
        torch.zeros(20000, 1),
        density=0.3,
        epsilon=0.2,
        rescale=False,
        random_seed=4,
    )
    assert abs(float(out.mean()) - 0.3) < 0.02


@pytest.mark.parametrize("epsilon", [0.3, 0.7, -0.3])
def test_epsilon_out_of_range_is_refused(epsilon):
    base, a = _models(1)
    with pytest.raises(ConfigError, match=r"epsilon: .*density - epsilon and density \+ epsilon"):
        della([a], base, density=0.3, epsilon=epsilon)
    # density 1 or 0 drops nothing or everything, whatever epsilon (as mergekit)
    torch.testing.assert_close(della_linear([a], base, density=1.0, epsilon=epsilon), a)


def test_defaults_are_mergekit_defaults():
    for cls, normalize in ((DellaParameters, True), (DellaLinearParameters, False)):
        p = cls()
        assert (p.normalize, p.rescale, p.rescale_method, p.lambda_, p.density, p.epsilon) == (
            normalize,
            True,
            "l1",
            1.0,
            1.0,
            0.15,
        )
    assert "consensus_method" not in DellaLinearParameters.model_fields


def test_a_mergekit_della_file_merges_to_the_formula(tmp_path):
    from safetensors.torch import load_file, save_file

    import modelfuse

    g = torch.Generator().manual_seed(9)
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.weight", "model.norm.weight"]
    shapes = [(10, 4), (4, 4), (4,)]
    states = [{n: torch.randn(s, generator=g) for n, s in zip(names, shapes)} for _ in range(3)]
    for i, state in enumerate(states):
        save_file(state, tmp_path / f"m{i}.safetensors")
    config = tmp_path / "della.yaml"
    config.write_text(
        "merge_method: della\n"
        f"base_model: {tmp_path / 'm0.safetensors'}\n"
        "models:\n"
        f"  - model: {tmp_path / 'm1.safetensors'}\n"
        "    parameters: {weight: 0.7, density: 0.5, epsilon: 0.1}\n"
        f"  - model: {tmp_path / 'm2.safetensors'}\n"
        "    parameters: {weight: 0.4, density: 0.6}\n"
        "parameters: {lambda: 0.9}\n"
        "dtype: float32\n"
    )
    modelfuse.merge(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for name in names:
        expected = _ref(
            states[0][name],
            [s[name] for s in states[1:]],
            [0.7, 0.4],
            [0.5, 0.6],
            [0.1, 0.15],
            tensor_generator(0, name),
            lam=0.9,
            normalize=True,
            consensus="sum",
        )
        torch.testing.assert_close(merged[name], expected)


def test_a_bad_epsilon_in_a_file_names_the_key(tmp_path):
    from safetensors.torch import save_file

    import modelfuse

    for i in range(2):
        save_file({"w": torch.randn(4, 4)}, tmp_path / f"m{i}.safetensors")
    config = tmp_path / "della.yaml"
    config.write_text(
        "merge_method: della_linear\n"
        f"base_model: {tmp_path / 'm0.safetensors'}\n"
        "models:\n"
        f"  - model: {tmp_path / 'm1.safetensors'}\n"
        "    parameters: {density: 0.1, epsilon: 0.2}\n"
    )
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    message = r"m1\.safetensors: .*epsilon: 0\.2 with density 0\.1 gives keep probabilities"
    with pytest.raises(ConfigError, match=message):  # found as the merge is planned
        plan_merge(config, tmp_path / "out")
    with pytest.raises(ConfigError, match=message):
        modelfuse.merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("epsilon", [0.4, -0.4])
def test_equal_magnitudes_are_ranked_by_position(epsilon):
    """Magnitudes 1, 1, 2, 2, 2, 3 ...: the stable rank is the column, so the kept
    fraction per column follows the line d - e + 2 e r / (m - 1) with ties too, and
    falls with the rank when epsilon is negative."""
    row = torch.tensor([1.0, -1, 2, 2, -2, 3, 3, 3, -3, 3])
    ramp = row.repeat(40000, 1)
    out = della_linear([ramp], torch.zeros_like(ramp), density=0.5, epsilon=epsilon,
                       rescale=False, random_seed=5)
    rates = (out != 0).double().mean(0).numpy()
    expected = 0.5 - epsilon + 2 * epsilon * np.arange(10) / 9
    # Binomial(40000, p): 6 standard deviations is at most 0.015
    assert np.abs(rates - expected).max() < 0.015


def test_keep_rates_of_a_three_dimensional_tensor_follow_the_ranks_along_its_second_dimension():
    g = torch.Generator().manual_seed(8)
    tau = torch.randn(6, 5, 4, generator=g)
    ranks = tau.abs().argsort(dim=1, stable=True).argsort(dim=1, stable=True).double()
    expected = 0.3 + 0.4 * ranks / 4
    draws = 6000
    kept = sum(
        (della_linear([tau], torch.zeros_like(tau), density=0.5, epsilon=0.2,
                      rescale=False, random_seed=s) != 0).double()
        for s in range(draws)
    ) / draws
    # Binomial(6000, p <= 0.7): 5 standard deviations is 0.03
    assert (kept - expected).abs().max() < 0.03


@pytest.mark.parametrize("epsilon", [0.15, -0.15, 0.0])
@pytest.mark.parametrize("shape", [(30, 40), (6, 10, 3)])
def test_keep_decisions_as_bools_or_into_a_float_buffer_are_the_same(epsilon, shape):
    from modelfuse.merge.methods.random_drops import della_groups, della_keep

    g = torch.Generator().manual_seed(2)
    values = torch.randn(shape, generator=g)
    draws = torch.from_numpy(uniforms(values.numel(), 3).reshape(shape))
    groups = della_groups(shape)
    kept = della_keep(values, draws, 0.4, epsilon, groups)
    buffer = draws.clone()  # the draws' own buffer takes the decisions
    into = della_keep(values, buffer, 0.4, epsilon, groups, out=buffer)
    assert kept.dtype == torch.bool and into.dtype == torch.float32
    assert into.data_ptr() == buffer.data_ptr()
    assert torch.equal(kept.float(), into)
    expected = _kept(values.numpy(), 0.4, abs(epsilon), draws.numpy()) if epsilon > 0 else None
    if expected is not None:
        assert np.array_equal(kept.numpy(), expected)


@pytest.mark.parametrize("epsilon", [0.15, -0.15, 0.0, 0.34])
@pytest.mark.parametrize("shape", [(30, 40), (6, 10, 3), (50, 3)])
def test_keep_decisions_from_integer_draws_are_those_of_the_float_draws(epsilon, shape):
    """uniform_words' integers w stand for the draws w * 2**-24: the same decisions,
    in every branch (the picks, one probability for all, ranked short rows), also when
    the decisions overwrite the integers' own buffer."""
    from modelfuse.merge.methods.random_drops import (
        della_groups,
        della_keep,
        uniform_draws,
        uniform_words,
    )

    g = torch.Generator().manual_seed(5)
    values = torch.randn(shape, generator=g).to(torch.bfloat16).float()  # equal magnitudes
    groups = della_groups(shape)
    words = uniform_words(9, 100, torch.empty(shape, dtype=torch.int32))
    draws = uniform_draws(9, 100, torch.empty(shape))
    assert torch.equal(words.double() * 2.0**-24, draws.double())
    expected = della_keep(values, draws, 0.6, epsilon, groups)
    assert torch.equal(della_keep(values, words, 0.6, epsilon, groups), expected)
    buffer = torch.empty(shape)
    into = della_keep(
        values, uniform_words(9, 100, buffer.view(torch.int32)), 0.6, epsilon, groups, out=buffer
    )
    assert torch.equal(into, expected.float())


@pytest.mark.parametrize("shape", [(30, 40), (6, 10, 3)])
def test_one_workspace_for_chunks_of_other_sizes_and_signs_decides_as_a_fresh_one(shape):
    """della_keep sets its views and sentinel keys up once per workspace: chunks of
    fewer rows and models with an epsilon of the other sign (which share the
    workspace's memory) still get the decisions of a workspace of their own."""
    from modelfuse.merge.methods.random_drops import della_groups, della_keep
    from modelfuse.merge.methods.workspace import Workspace

    g = torch.Generator().manual_seed(8)
    groups = della_groups(shape)
    space = Workspace(int(np.prod(shape)))
    full = shape[0]
    chunks = [(full, 0.2), (full, 0.2), (full, -0.2), (2, -0.2), (full, -0.2), (full, 0.2), (3, 0.1)]
    for rows, epsilon in chunks:
        part = (rows, *shape[1:])
        values = torch.randn(part, generator=g).to(torch.bfloat16).float()
        draws = torch.rand(part, generator=g)
        expected = della_keep(values, draws, 0.5, epsilon, groups).float()
        into = draws.clone()  # as the merge calls it: the decisions in the draws' buffer
        kept = della_keep(values, into, 0.5, epsilon, groups, out=into, workspace=space)
        assert torch.equal(kept, expected)
