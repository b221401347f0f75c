import math

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.methods.slerp import slerp


def _pair(seed=0, shape=(5, 7)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _reference(a, b, t):
    """SLERP written out with numpy in float64."""
    x, y = a.double().numpy().ravel(), b.double().numpy().ravel()
    cos = np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))
    if abs(cos) > 0.9995:
        out = (1 - t) * x + t * y
    else:
        omega = np.arccos(cos)
        out = (np.sin((1 - t) * omega) * x + np.sin(t * omega) * y) / np.sin(omega)
    return torch.from_numpy(out.reshape(a.shape)).float()


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.2])
def test_matches_formula_with_a_base_and_without(t):
    a, b = _pair()
    torch.testing.assert_close(slerp([b], a, t=t), _reference(a, b, t))
    torch.testing.assert_close(slerp([a, b], t=t), _reference(a, b, t))


def test_endpoints_are_the_inputs():
    a, b = _pair(1)
    torch.testing.assert_close(slerp([b], a, t=0.0), a)
    torch.testing.assert_close(slerp([b], a, t=1.0), b)


def test_result_stays_on_the_arc_for_unit_vectors():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    out = slerp([b], a, t=1 / 3)
    torch.testing.assert_close(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6), 0]))


@pytest.mark.parametrize("scale", [3.0, -2.0])
def test_parallel_and_antiparallel_fall_back_to_lerp(scale):
    a, _ = _pair(2)
    b = scale * a
    for t in (0.0, 0.25, 1.0):
        torch.testing.assert_close(slerp([b], a, t=t), (1 - t) * a + t * b)


def test_nearly_parallel_is_lerp_and_zero_tensor_is_lerp():
    a, noise = _pair(3)
    b = a + 1e-3 * noise  # cos > 0.9995
    torch.testing.assert_close(slerp([b], a, t=0.4), 0.6 * a + 0.4 * b)
    zero = torch.zeros_like(a)
    torch.testing.assert_close(slerp([a], zero, t=0.4), 0.4 * a)


def test_t_gradient_and_filters_through_state_dicts():
    a, b = _pair(4)
    base = {f"model.layers.{i}.self_attn.w": a for i in range(3)}
    base["model.layers.0.mlp.w"] = a
    other = {k: b for k in base}
    t = [{"filter": "mlp", "value": 0.9}, {"value": [0.0, 1.0]}]
    out = merge_state_dicts("slerp", [other], base, t=t)
    for i, ti in enumerate([0.0, 0.5, 1.0]):
        torch.testing.assert_close(out[f"model.layers.{i}.self_attn.w"], _reference(a, b, ti))
    torch.testing.assert_close(out["model.layers.0.mlp.w"], _reference(a, b, 0.9))


def test_wrong_number_of_models_and_missing_t():
    a, b = _pair()
    with pytest.raises(ConfigError, match="exactly one other model"):
        slerp([a, b], a, t=0.5)
    with pytest.raises(ConfigError, match="give two models"):
        slerp([a], t=0.5)
    with pytest.raises(ConfigError, match="t"):
        merge_state_dicts("slerp", [{"w": b}], {"w": a})


def test_inputs_are_not_modified():
    a, b = _pair(8)
    copies = a.clone(), b.clone()
    slerp([b], a, t=0.3)
    slerp([a, 2 * a], t=0.3)
    assert torch.equal(a, copies[0]) and torch.equal(b, copies[1])
