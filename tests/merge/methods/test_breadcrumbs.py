import pytest
import torch

from modelfuse.merge import merge_state_dicts
from modelfuse.merge.methods.breadcrumbs import BreadcrumbsParameters, breadcrumbs, breadcrumbs_ties

from .._reference import combine, outliers


def _models(n, shape=(10, 13), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).float() for _ in range(n + 1)]


def _ref(base, tensors, w, d, g, lam=1.0, normalize=False, consensus=None):
    b = base.double().numpy()
    taus = [outliers(t.double().numpy() - b, di, gi) for t, di, gi in zip(tensors, d, g)]
    return torch.from_numpy(combine(b, taus, w, lam, normalize, consensus)).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_breadcrumbs_matches_formula(dtype):
    base, *tensors = _models(3, dtype=dtype)
    w, d, g = [0.4, 1.0, 0.7], [0.5, 0.8, 0.3], [0.05, 0.1, 0.0]
    out = breadcrumbs(tensors, base, weight=w, density=d, gamma=g, lambda_=0.8)
    torch.testing.assert_close(out, _ref(base, tensors, w, d, g, 0.8))


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_breadcrumbs_ties_matches_formula(consensus):
    base, *tensors = _models(3)
    w, d, g = [1.0, 0.5, 2.0], [0.6, 0.6, 0.4], [0.1, 0.02, 0.2]
    out = breadcrumbs_ties(
        tensors, base, weight=w, density=d, gamma=g, normalize=True, consensus_method=consensus
    )
    torch.testing.assert_close(out, _ref(base, tensors, w, d, g, 1.0, True, consensus))


def test_hand_worked_example():
    base = torch.zeros(10)
    tau = torch.arange(1.0, 11.0)  # magnitudes 1..10
    # gamma 0.2 drops 10 and 9, density 0.5 keeps 8..4, the bottom 0.3 (3, 2, 1) go.
    expected = torch.tensor([0, 0, 0, 4, 5, 6, 7, 8, 0, 0.0])
    torch.testing.assert_close(breadcrumbs([tau], base, density=0.5, gamma=0.2), expected)


def test_gamma_plus_density_above_one_drops_fewer_large_entries():
    base = torch.zeros(10)
    tau = torch.arange(1.0, 11.0)
    # density 0.9 keeps 9 entries, so only the largest one is dropped, not gamma's 3.
    expected = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 0.0])
    torch.testing.assert_close(breadcrumbs([tau], base, density=0.9, gamma=0.3), expected)


def test_density_zero_and_one_all_zero_and_one_model():
    base, a, b = _models(2)
    torch.testing.assert_close(breadcrumbs([a, b], base, density=0.0, gamma=0.1), base)
    torch.testing.assert_close(breadcrumbs([a, b], base, density=1.0, gamma=0.1), a + b - base)
    torch.testing.assert_close(breadcrumbs_ties([base, base], base, density=0.5), base)
    torch.testing.assert_close(
        breadcrumbs([a], base, density=0.5, gamma=0.1), _ref(base, [a], [1], [0.5], [0.1])
    )


def test_small_tensors_still_keep_density_when_gamma_drops_nothing():
    # 13 entries, gamma 0.01: no large entry is dropped, int(0.5 * 13) = 6 are kept.
    base, a = _models(1, shape=(13,))
    out = breadcrumbs([a], base, density=0.5, gamma=0.01)
    assert int(torch.count_nonzero(out - base)) == 6


def test_opposite_signs_everywhere():
    base, tau = ((t * 16).round() / 16 for t in _models(1))
    a, b = base + tau, base - tau
    torch.testing.assert_close(breadcrumbs([a, b], base, density=0.5), base)
    kept = torch.from_numpy(outliers(tau.double().numpy(), 0.5, 0.01)).float()
    torch.testing.assert_close(breadcrumbs_ties([a, b], base, density=0.5), base + kept.abs())


def test_defaults_and_mergekit_block():
    p = BreadcrumbsParameters()
    assert (p.gamma, p.density, p.normalize, p.rescale) == (0.01, 1.0, False, False)
    base, a, b = _models(2)
    out = merge_state_dicts(
        "breadcrumbs_ties",
        [{"w": a}, {"w": b}],
        {"w": base},
        model_parameters=[
            {"weight": 1.0, "density": 0.7, "gamma": 0.05},
            {"weight": 0.5, "density": 0.6, "gamma": 0.02},
        ],
        int8_mask=True,
    )["w"]
    expected = _ref(base, [a, b], [1.0, 0.5], [0.7, 0.6], [0.05, 0.02], consensus="sum")
    torch.testing.assert_close(out, expected)


def test_tensor_larger_than_a_chunk():
    base, *tensors = _models(2, shape=(700, 600), seed=6, dtype=torch.bfloat16)
    out = breadcrumbs_ties(tensors, base, density=[0.3, 0.7], gamma=[0.05, 0.2])
    torch.testing.assert_close(
        out, _ref(base, tensors, [1, 1], [0.3, 0.7], [0.05, 0.2], consensus="sum")
    )


def test_tiny_densities_keep_int_density_n_as_mergekit():
    """mergekit 0.1.5 (sparsify.magnitude_outliers) keeps int(density * n) entries, with no
    floor of one (unlike its magnitude trim): at density 0.005 a 130-entry tensor keeps
    none; at 0.01 it keeps 1, the largest after int(gamma * n) = 1 outlier is dropped."""
    base, a = _models(1)
    tau = (a - base).reshape(-1)
    torch.testing.assert_close(breadcrumbs([a], base, density=0.005, gamma=0.01), base)
    order = torch.argsort(tau.abs(), descending=True)
    expected = torch.zeros(130)
    expected[order[1]] = tau[order[1]]
    out = breadcrumbs([a], base, density=0.01, gamma=0.01)
    torch.testing.assert_close(out, base + expected.reshape(10, 13))
    # rescale: true is mergekit's L1 rescale: the one kept entry carries the whole norm
    expected[order[1]] = torch.sign(tau[order[1]]) * tau.abs().sum()
    out = breadcrumbs([a], base, density=0.01, gamma=0.01, rescale=True)
    torch.testing.assert_close(out, base + expected.reshape(10, 13))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_rescaled_row_blocks_give_the_whole_tensors_bytes(monkeypatch, method):
    """With the L1 rescale the engine reduces each large tensor to its two thresholds and
    its factors, then merges blocks of rows alone: bitwise the whole tensor's result, from
    one thread or two, and the formula written out (integer task vectors: many ties)."""
    import numpy as np

    import modelfuse.merge.execute as execute
    import modelfuse.merge.schedule as schedule

    g = torch.Generator().manual_seed(12)
    base = {
        "w": torch.randint(-9, 9, (12, 5), generator=g).float(),
        "b": torch.randint(-9, 9, (30,), generator=g).float(),
    }
    models = [
        {k: v + torch.randint(-3, 4, v.shape, generator=g).float() for k, v in base.items()}
        for _ in range(3)
    ]
    params = {"density": 0.5, "gamma": 0.1, "rescale": True}
    whole = merge_state_dicts(method, models, base, **params)
    consensus = "sum" if method == "breadcrumbs_ties" else None
    for name in base:
        b = base[name].double().numpy()
        taus = []
        for m in models:
            tau = m[name].double().numpy() - b
            kept = outliers(tau, 0.5, 0.1)
            taus.append(kept * np.abs(tau).sum() / np.abs(kept).sum())
        expected = torch.from_numpy(combine(b, taus, [1, 1, 1], 1.0, False, consensus)).float()
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
    assert sum(rows is not None for rows in blocks) == 2 * (12 + 6)
    assert sorted(reductions) == ["b", "b", "w", "w"]
