import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import modelfuse
from modelfuse.errors import ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.methods.karcher import karcher, karcher_gram

from ..conftest import random_state


def _models(n, shape=(5, 8), seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(shape, generator=g)
    return [common + spread * torch.randn(shape, generator=g) for _ in range(n)]


def _reference(tensors, max_iter=10, tol=1e-5):
    """The Karcher mean as mergekit computes it, on the flattened vectors with numpy in
    float64: unit vectors, equal weights, Riemannian gradient steps (log map, step, exp
    map), then the weighted mean of the norms."""
    x = [t.double().numpy().ravel() for t in tensors]
    n = len(x)
    if n == 1:
        return tensors[0].float()
    alphas = [1.0 / n] * n
    norms = [float(np.linalg.norm(v)) for v in x]
    units = [v / m if m > 0 else np.zeros_like(v) for v, m in zip(x, norms)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return torch.zeros_like(tensors[0], dtype=torch.float32)
    a = np.array([alphas[i] for i in valid])
    a = a / a.sum()
    us = [units[i] for i in valid]
    u = sum(w * v for w, v in zip(a, us))
    if np.linalg.norm(u) < tol:
        u = us[0].copy()
    else:
        u = u / np.linalg.norm(u)
    for _ in range(max_iter):
        step = np.zeros_like(u)
        for w, v in zip(a, us):
            dot = np.clip(u @ v, -1.0, 1.0)
            theta = np.arccos(dot)
            if theta < tol:
                continue
            step += w * theta / np.sin(theta) * (v - dot * u)
        length = np.linalg.norm(step)
        if length < tol:
            break
        u = np.cos(length) * u + np.sin(length) * step / length
        if np.linalg.norm(u) > tol:
            u = u / np.linalg.norm(u)
    scale = sum(w * m for w, m in zip(alphas, norms))
    return torch.from_numpy((scale * u).reshape(tensors[0].shape)).float()


def _angle_sum_gradient(u, tensors):
    """Gradient of sum_i arccos(u . x_i/|x_i|)^2 on the sphere at unit u (zero at the mean)."""
    g = np.zeros_like(u)
    for t in tensors:
        v = t.double().numpy().ravel()
        v = v / np.linalg.norm(v)
        dot = np.clip(u @ v, -1, 1)
        theta = np.arccos(dot)
        g += -2 * theta / np.sin(theta) * (v - dot * u)
    return g


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("max_iter", [0, 1, 10])
def test_matches_mergekit_algorithm(n, max_iter):
    tensors = _models(n, seed=n)
    torch.testing.assert_close(karcher(tensors, max_iter=max_iter), _reference(tensors, max_iter))


def test_the_base_is_one_more_point_and_tol_stops_early():
    base, *tensors = _models(4, seed=7)
    torch.testing.assert_close(karcher(tensors, base), _reference(tensors + [base]))
    loose = karcher(tensors, base, tol=0.5)
    torch.testing.assert_close(loose, _reference(tensors + [base], tol=0.5))
    assert not torch.allclose(loose, karcher(tensors, base), atol=1e-6)


def test_converged_mean_is_where_the_angles_are_balanced():
    """With enough iterations the direction is the Karcher mean: the Riemannian gradient of
    the summed squared angles vanishes there, and the norm is the mean norm."""
    tensors = [t * s for t, s in zip(_models(3, seed=11), (0.5, 1.0, 3.0))]
    out = karcher(tensors, max_iter=200, tol=1e-12)
    norms = [float(t.double().norm()) for t in tensors]
    assert float(out.double().norm()) == pytest.approx(np.mean(norms), rel=1e-5)
    u = out.double().numpy().ravel() / np.linalg.norm(out.double().numpy())
    assert np.linalg.norm(_angle_sum_gradient(u, tensors)) < 1e-5


def test_two_points_give_the_slerp_midpoint_at_the_mean_norm():
    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    torch.testing.assert_close(karcher([a, b]), torch.tensor([3.0, 3.0, 0.0]) / np.sqrt(2))


def test_edge_cases_one_model_zero_and_antipodal_tensors():
    a, b = _models(2, seed=3)
    zero = torch.zeros_like(a)
    torch.testing.assert_close(karcher([a]), a)
    torch.testing.assert_close(karcher([zero, zero]), zero)
    # a zero tensor counts in the mean norm but not in the direction
    torch.testing.assert_close(karcher([a, zero]), a / 2)
    torch.testing.assert_close(karcher([a, b, zero]), _reference([a, b, zero]))
    # antipodal: the mean direction starts at ~0, so the first tensor's direction is kept
    torch.testing.assert_close(karcher([a, -a]), a)


def test_inputs_are_not_modified_and_bfloat16_larger_than_a_chunk():
    tensors = [t.to(torch.bfloat16) for t in _models(3, shape=(600, 700), seed=5)]
    copies = [t.clone() for t in tensors]
    out = karcher(tensors[1:], tensors[0])
    assert out.dtype == torch.float32
    # the Gram matrix is summed in float32 per chunk: relative error ~1e-6 on 420000 entries
    expected = _reference([t.float() for t in tensors[1:] + tensors[:1]])
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies))


def test_row_blocks_with_the_whole_tensors_gram_equal_the_whole_merge():
    tensors = _models(3, shape=(12, 7), seed=9)
    whole = karcher(tensors[1:], tensors[0])
    gram = karcher_gram(tensors[1:], tensors[0])
    blocks = [
        karcher([t[i : i + 5] for t in tensors[1:]], tensors[0][i : i + 5], gram=gram)
        for i in range(0, 12, 5)
    ]
    torch.testing.assert_close(torch.cat(blocks), whole)


def test_engine_merges_row_blocks_after_the_gram_reduction(monkeypatch):
    import modelfuse.merge.execute as execute
    import modelfuse.merge.schedule as schedule

    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(12, 5, generator=g), "b": torch.randn(30, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    whole = merge_state_dicts("karcher", models, base)
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 5)  # blocks of one row
    reductions, blocks = [], []
    reduce, call = execute._reduce, execute._call
    monkeypatch.setattr(execute, "_reduce", lambda *a: reductions.append(a[2]) or reduce(*a))
    monkeypatch.setattr(execute, "_call", lambda *a: blocks.append(a[3]) or call(*a))
    merged = merge_state_dicts("karcher", models, base, threads=2)
    for name in whole:
        torch.testing.assert_close(merged[name], whole[name], rtol=1e-6, atol=1e-6)
        points = [sd[name] for sd in models] + [base[name]]
        torch.testing.assert_close(whole[name], _reference(points))
    # one Gram matrix per block of rows (summed), then every block merged on its own
    assert sum(rows is not None for rows in blocks) == 12 + 6
    assert sorted(reductions) == sorted(rows for rows in blocks if rows is not None)


def test_parameters_are_checked():
    a, b = _models(2)
    with pytest.raises(ConfigError, match="max_iter"):
        merge_state_dicts("karcher", [{"w": a}, {"w": b}], max_iter=-1)
    with pytest.raises(ConfigError, match="tol"):
        merge_state_dicts("karcher", [{"w": a}, {"w": b}], tol=float("inf"))
    with pytest.raises(ConfigError, match="max_iter"):
        merge_state_dicts("karcher", [{"w": a}, {"w": b}], max_iter=10**9)


def test_mergekit_yaml_through_the_file_engine(tmp_path):
    """A mergekit karcher configuration (base listed among the models, tol in scientific
    notation): every floating tensor is the Karcher mean of the three models."""
    states = [random_state(i) for i in range(3)]
    paths = []
    for i, state in enumerate(states):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, paths[-1])
    config = tmp_path / "karcher.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "karcher",
                "base_model": str(paths[0]),
                "models": [{"model": str(p)} for p in paths],
                "dtype": "float32",
            }
        )
        + "parameters:\n  max_iter: 20\n  tol: 1e-7\n"
    )
    result = modelfuse.merge(config, tmp_path / "out")
    merged = load_file(result.out / "model.safetensors")
    for name, tensor in states[0].items():
        if tensor.is_floating_point():
            expected = _reference([sd[name] for sd in states], max_iter=20, tol=1e-7)
            torch.testing.assert_close(merged[name], expected)
        else:
            assert torch.equal(merged[name], tensor)
