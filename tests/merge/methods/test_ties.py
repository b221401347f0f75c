import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.methods.ties import TiesParameters, ties

from .._reference import combine, trim


def _models(n, shape=(6, 7), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).float() for _ in range(n + 1)]


def _ref(base, tensors, weights, density, lam=1.0, normalize=True, consensus="sum"):
    b = base.double().numpy()
    taus = [trim(t.double().numpy() - b, d) for t, d in zip(tensors, density)]
    return torch.from_numpy(combine(b, taus, weights, lam, normalize, consensus)).float()


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_formula(consensus, normalize):
    base, *tensors = _models(3)
    w, d = [0.7, 1.3, -0.4], [0.3, 0.5, 0.9]
    result = ties(
        tensors,
        base,
        weight=w,
        density=d,
        lambda_=1.7,
        normalize=normalize,
        consensus_method=consensus,
    )
    expected = _ref(base, tensors, w, d, 1.7, normalize, consensus)
    torch.testing.assert_close(result, expected)


def test_ties_in_magnitude_keep_exactly_k_lowest_index_first():
    # bfloat16 values repeat often: exactly int(density * n) entries survive.
    base, *tensors = _models(2, shape=(40, 50), dtype=torch.bfloat16)
    result = ties(tensors, base, density=[0.2, 0.35])
    torch.testing.assert_close(result, _ref(base, tensors, [1, 1], [0.2, 0.35]))


def test_count_election_differs_from_sum():
    base = torch.zeros(1)
    tensors = [torch.tensor([-10.0]), torch.tensor([1.0]), torch.tensor([2.0])]
    assert ties(tensors, base, consensus_method="sum").item() == -10.0
    assert ties(tensors, base, consensus_method="count").item() == 1.5


def test_density_zero_returns_base_and_one_keeps_everything():
    base, *tensors = _models(2)
    torch.testing.assert_close(ties(tensors, base, density=0.0), base)
    torch.testing.assert_close(
        ties(tensors, base, density=1.0), _ref(base, tensors, [1, 1], [1, 1])
    )


def test_all_zero_task_vectors_give_the_base():
    base, _ = _models(1)
    torch.testing.assert_close(ties([base.clone(), base.clone()], base, density=0.5), base)


def _opposite(seed=3):
    base, tau = ((t * 16).round() / 16 for t in _models(1, seed=seed))  # exact in float32
    return base, tau, base + tau, base - tau


def test_opposite_signs_everywhere_elect_plus():
    base, tau, a, b = _opposite()  # tau_b = -tau_a everywhere: the sum is 0, so + is elected
    torch.testing.assert_close(ties([a, b], base), base + tau.abs(), rtol=0, atol=0)
    torch.testing.assert_close(ties([a, b], base, consensus_method="count"), base + tau.abs())


def test_one_model_normalized_is_its_trimmed_task_vector_whatever_the_weight():
    base, a = _models(1)
    tau = torch.from_numpy(trim((a - base).double().numpy(), 0.4)).float()
    torch.testing.assert_close(
        ties([a], base, weight=[3.0], density=0.4, lambda_=0.5), base + 0.5 * tau
    )


def test_defaults_are_mergekit_defaults():
    p = TiesParameters()
    assert (p.normalize, p.lambda_, p.rescale, p.consensus_method, p.scope) == (
        True,
        1.0,
        False,
        "sum",
        "tensor",
    )
    assert p.weight == 1.0 and p.density == 1.0


def test_reads_a_mergekit_parameter_block():
    base, a, b = _models(2)
    sd = [{"w": a}, {"w": b}]
    out = merge_state_dicts(
        "ties",
        sd,
        {"w": base},
        model_parameters=[{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}],
        normalize=False,
        int8_mask=True,
        **{"lambda": 0.9},
    )["w"]
    torch.testing.assert_close(out, _ref(base, [a, b], [0.6, 0.4], [0.5, 0.7], 0.9, False))


def _split_model(seed, sizes, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.w": torch.randn(s, generator=g).to(dtype).float()
        for i, s in enumerate(sizes)
    }


def test_global_scope_threshold_equals_the_concatenated_models():
    sizes = [37, 500, 1200, 9, 3000, 64, 777, 2500]
    base = _split_model(0, sizes)
    models = [_split_model(s, sizes) for s in (1, 2)]
    densities = [0.1, 0.37]
    from modelfuse.merge.execute import prepare_stream
    from modelfuse.merge.plan import ModelInput, build_plan
    from modelfuse.merge.registry import get_method
    from modelfuse.merge.state_dict import StateDictSource

    method = get_method("ties")
    plan = build_plan(
        method,
        [
            ModelInput(f"m{i}", StateDictSource(sd, f"m{i}"), {"density": d})
            for i, (sd, d) in enumerate(zip(models, densities))
        ],
        ModelInput("base", StateDictSource(base, "base")),
        {"scope": "global"},
    )
    thresholds = method.prepare(prepare_stream(plan))["magnitude_thresholds"]
    names = list(base)
    for i, (sd, d) in enumerate(zip(models, densities)):
        concatenated = torch.cat([(sd[k] - base[k]).abs() for k in names])
        k = int(d * concatenated.numel())
        kth = float(torch.sort(concatenated, descending=True).values[k - 1])
        assert thresholds[i].value == kth
        assert thresholds[i].kept == k and thresholds[i].total == concatenated.numel()

    merged = merge_state_dicts(
        "ties", models, base, scope="global", model_parameters=[{"density": d} for d in densities]
    )
    flat_base = torch.cat([base[k] for k in names])
    flat = [torch.cat([sd[k] for k in names]) for sd in models]
    expected = _ref(flat_base, flat, [1, 1], densities)
    torch.testing.assert_close(torch.cat([merged[k] for k in names]), expected)


def test_global_scope_applies_only_to_the_tensors_that_ask_for_it():
    sizes = [300, 400, 500]
    base = _split_model(0, sizes, torch.float32)
    models = [_split_model(s, sizes, torch.float32) for s in (1, 2)]
    scope = [{"filter": "layers.2", "value": "tensor"}, {"value": "global"}]
    merged = merge_state_dicts("ties", models, base, scope=scope, density=0.3)
    names = ["model.layers.0.w", "model.layers.1.w"]
    flat_base = torch.cat([base[k] for k in names])
    flat = [torch.cat([sd[k] for k in names]) for sd in models]
    torch.testing.assert_close(
        torch.cat([merged[k] for k in names]), _ref(flat_base, flat, [1, 1], [0.3, 0.3])
    )
    last = "model.layers.2.w"
    torch.testing.assert_close(
        merged[last], _ref(base[last], [sd[last] for sd in models], [1, 1], [0.3, 0.3])
    )


def test_global_scope_needs_one_density_per_model():
    sizes = [30, 40]
    base = _split_model(0, sizes)
    models = [_split_model(1, sizes)]
    with pytest.raises(ConfigError, match="one density over the whole model"):
        merge_state_dicts("ties", models, base, scope="global", density=[0.2, 0.5])


def test_global_scope_outside_the_engine_is_an_error():
    base, a = _models(1)
    with pytest.raises(ConfigError, match="prepare"):
        ties([a], base, scope="global", density=0.5)


def test_density_out_of_range_is_a_config_error():
    base, a = _models(1)
    with pytest.raises(ConfigError, match="density"):
        merge_state_dicts("ties", [{"w": a}], {"w": base}, density=1.5)


def test_l1_rescale_restores_the_norm_of_each_trimmed_task_vector():
    base, a = _models(1)
    tau = (a - base).double().numpy()
    kept = trim(tau, 0.3)
    kept *= np.abs(tau).sum() / np.abs(kept).sum()
    result = ties([a], base, density=0.3, rescale=True, rescale_method="l1")
    torch.testing.assert_close(result, base + torch.from_numpy(kept).float())
    # rescale: true alone is mergekit's (the L1 norm); dividing by density is one setting away
    torch.testing.assert_close(ties([a], base, density=0.3, rescale=True), result)
    exact = ties([a], base, density=0.3, rescale=True, rescale_method="exact")
    torch.testing.assert_close(exact, base + torch.from_numpy(trim(tau, 0.3) / 0.3).float())


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_tensor_larger_than_a_chunk_with_many_ties(consensus):
    # 420000 bfloat16 entries: several chunks, sampled bracketing, ties split across chunks.
    base, *tensors = _models(2, shape=(700, 600), seed=5, dtype=torch.bfloat16)
    # Dyadic weights: the products are exact, so exact sign ties resolve the same way.
    out = ties(tensors, base, density=[0.2, 0.55], weight=[0.75, 1.25], consensus_method=consensus)
    torch.testing.assert_close(
        out, _ref(base, tensors, [0.75, 1.25], [0.2, 0.55], consensus=consensus)
    )


@pytest.mark.parametrize("density", [1e-9, 0.01, 0.02])
def test_tiny_densities_keep_at_least_one_entry_as_mergekit(density):
    """mergekit 0.1.5 (sparsify.magnitude) keeps k = max(1, int(density * n)) entries for
    any density > 0 (mergekit 0.1.4 and older stopped on an assertion when int(...) was 0):
    here n = 42, so 1e-9 and 0.01 keep the single largest |tau|, 0.02 too (0.84 -> 1)."""
    base, a = _models(1)
    tau = (a - base).reshape(-1)
    largest = int(tau.abs().argmax())
    expected = torch.zeros(42)
    expected[largest] = tau[largest]
    out = ties([a], base, density=density)
    torch.testing.assert_close(out, base + expected.reshape(6, 7))
    with_rescale = ties([a], base, density=density, rescale=True)  # one entry: L1 restored
    expected[largest] = torch.sign(tau[largest]) * tau.abs().sum()
    torch.testing.assert_close(with_rescale, base + expected.reshape(6, 7))
    torch.testing.assert_close(ties([a], base, density=0.0), base)  # 0 still keeps nothing


def test_tiny_density_through_a_configuration_and_global_scope():
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(4, 5, generator=g), "v": torch.randn(3, generator=g)}
    model = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    for scope, kept in [("tensor", {"w": 1, "v": 1}), ("global", None)]:
        merged = merge_state_dicts("ties", [model], base, density=0.01, scope=scope)
        changed = {k: int((merged[k] != base[k]).sum()) for k in base}
        if kept is not None:
            assert changed == kept
        else:  # the one largest |tau| of the 23 entries of the whole model
            taus = {k: (model[k] - base[k]).abs().max() for k in base}
            top = max(taus, key=lambda k: float(taus[k]))
            assert changed == {k: int(k == top) for k in base}


def test_l1_rescale_with_global_scope_is_per_tensor_after_the_global_trim():
    """With scope: global the trim is the whole model's, and rescale: true (mergekit's L1)
    still restores each tensor's task-vector L1 norm. Integer task vectors: many ties at
    the threshold, kept earlier tensor and lower index first."""
    sizes = [37, 500, 9, 300]
    base = _split_model(0, sizes)
    g = torch.Generator().manual_seed(4)
    model = {k: v + torch.randint(-3, 4, v.shape, generator=g).float() for k, v in base.items()}
    merged = merge_state_dicts("ties", [model], base, scope="global", density=0.2, rescale=True)
    names = list(base)
    flat_tau = torch.cat([(model[k] - base[k]) for k in names]).double().numpy()
    kept = trim(flat_tau, 0.2)  # the 20 % largest over the whole model, lower index first
    start = 0
    for name in names:
        tau = flat_tau[start : start + base[name].numel()]
        part = kept[start : start + base[name].numel()]
        start += base[name].numel()
        before, after = np.abs(tau).sum(), np.abs(part).sum()
        expected = part * (before / after) if after >= 1e-7 and before >= 1e-7 else part
        got = (merged[name] - base[name]).double().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def _integer_models(seed, n=3):
    """Integer base and task vectors (exact in float32): many magnitudes tie at the
    thresholds, across blocks of rows."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "w": torch.randint(-9, 9, (12, 5), generator=g).float(),
        "b": torch.randint(-9, 9, (30,), generator=g).float(),
    }
    models = [
        {k: v + torch.randint(-3, 4, v.shape, generator=g).float() for k, v in base.items()}
        for _ in range(n)
    ]
    return base, models


def _norm_ratio(tau, kept, norm):
    if norm == "l1":
        before, after = np.abs(tau).sum(), np.abs(kept).sum()
    else:
        before, after = np.sqrt((tau**2).sum()), np.sqrt((kept**2).sum())
    return before / after if before >= 1e-7 and after >= 1e-7 else 1.0


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_rescaled_row_blocks_give_the_whole_tensors_bytes(monkeypatch, norm):
    """With a norm rescale the engine reduces each large tensor to its thresholds and
    factors (one pass more over the whole tensor) and merges blocks of rows alone: bitwise
    the whole tensor's result, from one thread or two, and the formula written out."""
    import modelfuse.merge.execute as execute
    import modelfuse.merge.schedule as schedule

    base, models = _integer_models(11)
    params = {"density": 0.4, "rescale": True, "rescale_method": norm}
    whole = merge_state_dicts("ties", models, base, **params)
    for name in base:
        b = base[name].double().numpy()
        taus = []
        for m in models:
            tau = m[name].double().numpy() - b
            kept = trim(tau, 0.4)
            taus.append(kept * _norm_ratio(tau, kept, norm))
        expected = torch.from_numpy(combine(b, taus, [1, 1, 1], 1.0, True, "sum")).float()
        torch.testing.assert_close(whole[name], expected)
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 5)  # blocks of one row (of 5 entries of b)
    reductions, blocks = [], []
    reduce, call = execute._reduce, execute._call
    monkeypatch.setattr(execute, "_reduce", lambda *a: reductions.append(a[1].name) or reduce(*a))
    monkeypatch.setattr(execute, "_call", lambda *a: blocks.append(a[3]) or call(*a))
    for threads in (1, 2):
        merged = merge_state_dicts("ties", models, base, threads=threads, **params)
        for name in whole:
            assert torch.equal(merged[name], whole[name])
    assert sum(rows is not None for rows in blocks) == 2 * (12 + 6)
    assert sorted(reductions) == ["b", "b", "w", "w"]
