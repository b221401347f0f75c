import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import modelfuse
from modelfuse.errors import ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.methods.nearswap import nearswap

from ..conftest import random_state


def _pair(seed=0, shape=(6, 9), spread=0.1):
    """A base and a model that differs from it by amounts on both sides of small t."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    return a, a + spread * torch.randn(shape, generator=g)


def _reference(a, b, t):
    """mergekit's nearswap written out with numpy in float64: weight t / |a - b|
    (distances clamped at 1e-6), clipped to [0, 1]; w b + (1 - w) a."""
    x, y = a.double().numpy(), b.double().numpy()
    w = np.clip(t / np.maximum(np.abs(x - y), 1e-6), 0.0, 1.0)
    return torch.from_numpy(w * y + (1 - w) * x).float()


@pytest.mark.parametrize("t", [0.0, 1e-4, 0.05, 0.1, 2.0, -0.3])
def test_matches_formula(t):
    a, b = _pair()
    torch.testing.assert_close(nearswap([b], a, t=t), _reference(a, b, t))


def test_close_entries_are_swapped_far_ones_move_by_t():
    a = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0])
    b = torch.tensor([1.02, 0.5, 3.0, 1.0, 1.9])
    out = nearswap([b], a, t=0.1)
    # |a-b| = 0.02 -> b; 0.5 -> a - 0.1; 2 -> a + 0.1; equal -> b; exactly t -> b
    torch.testing.assert_close(out, torch.tensor([1.02, 0.9, 1.1, 1.0, 1.9]))
    torch.testing.assert_close(nearswap([b], a, t=0.0), a)
    torch.testing.assert_close(nearswap([b], a, t=10.0), b)


def test_bfloat16_inputs_and_tensor_larger_than_a_chunk():
    a, b = _pair(1, shape=(700, 500), spread=0.05)
    a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
    out = nearswap([b], a, t=0.02)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _reference(a.float(), b.float(), 0.02))


def test_inputs_are_not_modified():
    a, b = _pair(2)
    copies = a.clone(), b.clone()
    nearswap([b], a, t=0.05)
    assert torch.equal(a, copies[0]) and torch.equal(b, copies[1])


def test_needs_a_base_one_other_model_and_t():
    a, b = _pair(3)
    with pytest.raises(ConfigError, match="set base_model"):
        nearswap([b], None, t=0.1)
    with pytest.raises(ConfigError, match="exactly one other model; got 2"):
        nearswap([b, b], a, t=0.1)
    with pytest.raises(ConfigError, match="needs a base model"):
        merge_state_dicts("nearswap", [{"w": b}], t=0.1)
    with pytest.raises(ConfigError, match="t"):
        merge_state_dicts("nearswap", [{"w": b}], {"w": a})
    with pytest.raises(ConfigError, match="nearswap"):
        merge_state_dicts("nearswap", [{"w": b}, {"w": a}], {"w": a}, t=0.1)
    with pytest.raises(ConfigError, match="t"):
        merge_state_dicts("nearswap", [{"w": b}], {"w": a}, t=float("nan"))


def test_t_gradient_and_filters_through_state_dicts():
    a, b = _pair(4)
    base = {f"model.layers.{i}.self_attn.w": a for i in range(3)}
    base["model.layers.0.mlp.w"] = a
    other = {k: b for k in base}
    t = [{"filter": "mlp", "value": 0.3}, {"value": [0.0, 0.2]}]
    out = merge_state_dicts("nearswap", [other], base, t=t)
    for i, ti in enumerate([0.0, 0.1, 0.2]):
        torch.testing.assert_close(out[f"model.layers.{i}.self_attn.w"], _reference(a, b, ti))
    torch.testing.assert_close(out["model.layers.0.mlp.w"], _reference(a, b, 0.3))


def test_mergekit_yaml_through_the_file_engine(tmp_path):
    """A mergekit nearswap configuration (the base listed among the models, t in
    scientific notation) merges every floating tensor by the formula."""
    states = [random_state(0), random_state(1)]
    states[1] = {
        k: v + 0.05 * random_state(2)[k] if v.is_floating_point() else v
        for k, v in states[1].items()
    }
    paths = []
    for i, state in enumerate(states):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, paths[-1])
    config = tmp_path / "nearswap.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "nearswap",
                "base_model": str(paths[0]),
                "models": [{"model": str(paths[0])}, {"model": str(paths[1])}],
                "dtype": "float32",
            }
        )
        + "parameters:\n  t: 5e-2\n"
    )
    before = [p.read_bytes() for p in paths]
    result = modelfuse.merge(config, tmp_path / "out")
    merged = load_file(result.out / "model.safetensors")
    for name, tensor in states[0].items():
        if tensor.is_floating_point():
            torch.testing.assert_close(merged[name], _reference(tensor, states[1][name], 0.05))
        else:
            assert torch.equal(merged[name], tensor)
    assert [p.read_bytes() for p in paths] == before
