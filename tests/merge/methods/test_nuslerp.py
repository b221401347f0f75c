import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import modelfuse
from modelfuse.errors import ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.methods.nuslerp import nuslerp, nuslerp_products

from ..conftest import random_state


def _models(n, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _slerp_rows(t, v0, v1):
    """SLERP of each row of two float64 matrices, as mergekit's nuslerp: norms clamped at
    1e-7, linear interpolation where |sin| < 1e-8."""
    u0 = v0 / np.maximum(np.linalg.norm(v0, axis=-1, keepdims=True), 1e-7)
    u1 = v1 / np.maximum(np.linalg.norm(v1, axis=-1, keepdims=True), 1e-7)
    theta = np.arccos(np.clip((u0 * u1).sum(-1, keepdims=True), -1, 1))
    s = np.sin(theta)
    colinear = np.abs(s) < 1e-8
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / s
    return np.where(colinear, (1 - t) * v0 + t * v1, out)


def _reference(tensors, weights, base=None, flatten=True, row_wise=False):
    """mergekit's nuslerp written out with numpy in float64."""
    a, b = (t.double().numpy() for t in tensors)
    if base is not None:
        a, b = a - base.double().numpy(), b - base.double().numpy()
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    shape = a.shape
    if flatten or a.ndim <= 1:
        out = _slerp_rows(t, a.reshape(1, -1), b.reshape(1, -1)).reshape(shape)
    elif row_wise:  # vectors along the first dimension
        out = np.swapaxes(_slerp_rows(t, np.swapaxes(a, 0, -1), np.swapaxes(b, 0, -1)), 0, -1)
    else:
        out = _slerp_rows(t, a, b)
    if base is not None:
        out = out + base.double().numpy()
    return torch.from_numpy(np.ascontiguousarray(out)).float()


MODES = [(True, False), (False, False), (False, True)]


@pytest.mark.parametrize("flatten,row_wise", MODES)
@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.2, 0.8], [3.0, -1.0], [1.0, -1.0]])
def test_matches_mergekit_formula(flatten, row_wise, weights):
    a, b, c = _models(3, shape=(4, 6, 3))
    kw = {"weight": weights, "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    torch.testing.assert_close(
        nuslerp([a, b], **kw), _reference([a, b], weights, None, flatten, row_wise)
    )
    torch.testing.assert_close(
        nuslerp([a, b], c, **kw), _reference([a, b], weights, c, flatten, row_wise)
    )
    for shape in [(7,), (6, 5)]:  # 1-D is one vector in every mode
        x, y = _models(2, shape=shape, seed=1)
        torch.testing.assert_close(
            nuslerp([x, y], **kw), _reference([x, y], weights, None, flatten, row_wise)
        )


def test_closed_forms_quarter_circle_and_colinear():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = nuslerp([a, b], weight=[2.0, 1.0])  # t = 1/3 of 90 degrees
    torch.testing.assert_close(out, torch.tensor([np.cos(np.pi / 6), np.sin(np.pi / 6)]).float())
    torch.testing.assert_close(nuslerp([a, 3 * a], weight=[1.0, 3.0]), 2.5 * a)  # t = 3/4, lerp
    zero = torch.zeros(2)
    # a zero vector is at 90 degrees: the other is scaled by sin(t pi/2), as in mergekit
    torch.testing.assert_close(nuslerp([zero, a]), a * np.sin(np.pi / 4))


def test_block_of_rows_with_the_whole_tensors_products():
    a, b, c = _models(3, shape=(9, 4), seed=2)
    for flatten, row_wise in MODES:
        kw = {"weight": [0.3, 0.7], "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
        whole = nuslerp([a, b], c, **kw)
        products = nuslerp_products([a, b], c, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
        parts = [
            nuslerp([a[i : i + 4], b[i : i + 4]], c[i : i + 4], products=products, **kw)
            for i in range(0, 9, 4)
        ]
        torch.testing.assert_close(torch.cat(parts), whole)


@pytest.mark.parametrize("flatten,row_wise", MODES)
def test_engine_row_blocks_equal_the_whole_merge(monkeypatch, flatten, row_wise):
    import modelfuse.merge.execute as execute
    import modelfuse.merge.schedule as schedule

    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(12, 5, generator=g), "b": torch.randn(30, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    kw = {"weights": [0.4, 0.6], "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    whole = merge_state_dicts("nuslerp", models, base, **kw)
    monkeypatch.setattr(schedule, "BLOCK_ELEMENTS", 5)  # blocks of one row
    blocks = []
    call = execute._call
    monkeypatch.setattr(execute, "_call", lambda *a: blocks.append(a[3]) or call(*a))
    merged = merge_state_dicts("nuslerp", models, base, threads=2, **kw)
    for name in whole:
        torch.testing.assert_close(merged[name], whole[name], rtol=1e-6, atol=1e-6)
        expected = _reference(
            [sd[name] for sd in models], [0.4, 0.6], base[name], flatten, row_wise
        )
        torch.testing.assert_close(whole[name], expected)
    assert sum(rows is not None for rows in blocks) == 12 + 6


def test_two_models_and_inputs_untouched():
    a, b, c = _models(3, seed=4)
    copies = [t.clone() for t in (a, b, c)]
    nuslerp([a, b], weight=[1.0, 2.0], nuslerp_flatten=False)
    nuslerp([a, b], c)
    assert all(torch.equal(t, u) for t, u in zip((a, b, c), copies))
    with pytest.raises(ConfigError, match="exactly two models besides the base model; got 3"):
        nuslerp([a, b, c], a)
    with pytest.raises(ConfigError, match="nuslerp"):
        merge_state_dicts("nuslerp", [{"w": a}, {"w": b}, {"w": c}])
    with pytest.raises(ConfigError, match="nuslerp"):
        merge_state_dicts("nuslerp", [{"w": a}], {"w": c})


def test_mergekit_yaml_through_the_file_engine(tmp_path):
    """A mergekit nuslerp configuration with a base and per-model weights (one in
    scientific notation) and row vectors."""
    states = [random_state(i) for i in range(3)]
    paths = []
    for i, state in enumerate(states):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, paths[-1])
    config = tmp_path / "nuslerp.yaml"
    config.write_text(
        yaml.safe_dump({"merge_method": "nuslerp", "base_model": str(paths[0]), "dtype": "float32"})
        + f"models:\n  - model: {paths[1]}\n    parameters: {{weight: 5e-1}}\n"
        f"  - model: {paths[2]}\n    parameters: {{weight: 1.5}}\n"
        "parameters:\n  nuslerp_flatten: false\n"
    )
    result = modelfuse.merge(config, tmp_path / "out")
    merged = load_file(result.out / "model.safetensors")
    for name, tensor in states[0].items():
        if tensor.is_floating_point():
            expected = _reference([states[1][name], states[2][name]], [0.5, 1.5], tensor, False)
            torch.testing.assert_close(merged[name], expected)
        else:
            assert torch.equal(merged[name], tensor)


@pytest.mark.parametrize("flatten,row_wise", MODES)
def test_bfloat16_tensor_larger_than_a_chunk(flatten, row_wise):
    a, b, c = (t.to(torch.bfloat16) for t in _models(3, shape=(1100, 1000), seed=6))
    kw = {"weight": [0.6, 0.4], "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    out = nuslerp([a, b], c, **kw)
    assert out.dtype == torch.float32
    expected = _reference([a.float(), b.float()], [0.6, 0.4], c.float(), flatten, row_wise)
    torch.testing.assert_close(out, expected)
