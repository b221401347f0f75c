import numpy as np
import pytest
import torch

from modelfuse.errors import DataError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.methods.multislerp import multislerp


def _models(n, shape=(4, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _reference(tensors, weights, base=None, normalize=True, eps=1e-8):
    """Barycentric interpolation on the sphere written out step by step (numpy, float64):
    unit vectors, weighted mean direction, tangent projection, exponential map back."""
    x = np.stack([t.double().numpy().ravel() for t in tensors])
    if base is not None:
        x = x - base.double().numpy().ravel()
    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / (norms + eps)
    mean = (unit * w[:, None]).sum(0)
    mean = mean / np.linalg.norm(mean)
    tangent = unit - (unit @ mean)[:, None] * mean
    step = (tangent * w[:, None]).sum(0)
    length = np.linalg.norm(step) + eps
    point = mean * np.cos(length) + step * np.sin(length) / length
    out = point * float((norms[:, 0] * w).sum())
    if base is not None:
        out = out + base.double().numpy().ravel()
    return torch.from_numpy(out.reshape(tensors[0].shape)).float()


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_the_tangent_space_formula(normalize):
    tensors = _models(4)
    w = [0.1, 0.5, 0.3, 0.6]
    out = multislerp(tensors, weight=w, normalize_weights=normalize)
    torch.testing.assert_close(out, _reference(tensors, w, normalize=normalize))


def test_task_vector_space_with_a_base():
    base, *tensors = _models(4, seed=1)
    w = [1.0, 2.0, 0.5]
    torch.testing.assert_close(multislerp(tensors, base, weight=w), _reference(tensors, w, base))


def test_two_models_on_a_circle_is_the_angle_bisector_at_mean_norm():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    torch.testing.assert_close(multislerp([a, b]), torch.tensor([3.0, 3.0]) / np.sqrt(2))


def test_parallel_is_the_weighted_mean():
    a, _ = _models(2)
    out = multislerp([a, 3 * a], weight=[1.0, 3.0])
    torch.testing.assert_close(out, (a + 9 * a) / 4)


def test_antiparallel_two_models_fall_back_to_linear_and_three_models_raise():
    a, _ = _models(2)
    torch.testing.assert_close(multislerp([a, -a]), torch.zeros_like(a))
    c = torch.zeros_like(a)
    c[0, 0] = 1.0
    with pytest.raises(DataError, match="change the weights"):
        multislerp([a, -a, c], weight=[1.0, 1.0, 0.0], normalize_weights=False)


def test_one_model_and_all_zero_task_vectors():
    base, a = _models(2, seed=3)
    torch.testing.assert_close(multislerp([a], base), a)
    torch.testing.assert_close(multislerp([base, base, base], base), base)


def test_mergekit_block_through_state_dicts():
    base, a, b = _models(3, seed=5)
    out = merge_state_dicts(
        "multislerp",
        [{"w": a}, {"w": b}],
        {"w": base},
        weights=[0.3, 0.7],
        normalize_weights=True,
        eps=1e-8,
    )["w"]
    torch.testing.assert_close(out, _reference([a, b], [0.3, 0.7], base))
    plain = merge_state_dicts("multislerp", [{"w": a}, {"w": b}], weights=[0.3, 0.7])["w"]
    torch.testing.assert_close(plain, _reference([a, b], [0.3, 0.7]))


def test_inputs_are_not_modified():
    tensors = _models(3, seed=9)
    copies = [t.clone() for t in tensors]
    multislerp(tensors, weight=[1.0, 2.0, 3.0])
    multislerp(tensors[1:], tensors[0])
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies))


def test_tensor_larger_than_a_chunk():
    base, *tensors = _models(4, shape=(700, 600), seed=12)
    w = [0.2, 0.5, 0.3]
    torch.testing.assert_close(multislerp(tensors, base, weight=w), _reference(tensors, w, base))
