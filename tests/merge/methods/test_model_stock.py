import itertools

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.methods.model_stock import model_stock


def _models(n, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    shared = torch.randn(shape, generator=g)
    # Task vectors sharing a direction, so the cosines are clearly positive.
    return base, [base + shared + 0.8 * torch.randn(shape, generator=g) for _ in range(n)]


def _reference(base, tensors, rowwise=False, angle=False):
    b = base.double().numpy()
    rows = b.shape[0] if rowwise else 1
    taus = [(t.double().numpy() - b).reshape(rows, -1) for t in tensors]
    n = len(taus)
    cos = []
    for x, y in itertools.combinations(taus, 2):
        c = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-6)
        cos.append(np.clip(c, -1, 1))
    cos = np.cos(np.arccos(cos).mean(0)) if angle else np.mean(cos, axis=0)
    t = n * cos / (1 + (n - 1) * cos)
    avg = np.mean([x.reshape(rows, -1) for x in (tt.double().numpy() for tt in tensors)], axis=0)
    out = t[:, None] * avg + (1 - t[:, None]) * b.reshape(rows, -1)
    return torch.from_numpy(out.reshape(b.shape)).float()


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("rowwise", [False, True])
def test_matches_formula(n, rowwise):
    base, tensors = _models(n)
    torch.testing.assert_close(
        model_stock(tensors, base, filter_wise=rowwise), _reference(base, tensors, rowwise)
    )


def test_mean_angle_option_differs_for_more_than_two_models():
    base, tensors = _models(4, seed=2)
    by_angle = model_stock(tensors, base, pairwise_mean="angle")
    torch.testing.assert_close(by_angle, _reference(base, tensors, angle=True))
    assert not torch.allclose(by_angle, model_stock(tensors, base))
    two_base, two = _models(2, seed=2)
    torch.testing.assert_close(
        model_stock(two, two_base, pairwise_mean="angle"), model_stock(two, two_base)
    )


def test_two_models_closed_form_from_the_paper():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5 * float(np.sqrt(3.0))])  # 60 degrees
    t = 2 * 0.5 / (1 + 0.5)
    torch.testing.assert_close(model_stock([a, b], base), t * (a + b) / 2)


def test_bias_rows_filter_wise_is_one_row():
    base, tensors = _models(3, shape=(7,), seed=4)
    torch.testing.assert_close(
        model_stock(tensors, base, filter_wise=True), model_stock(tensors, base)
    )


def test_edge_cases_zero_and_opposite_task_vectors():
    base, (a,) = _models(1)
    torch.testing.assert_close(model_stock([base, base], base), base)  # cos 0 -> t 0
    base, tau = (base * 16).round() / 16, ((a - base) * 16).round() / 16  # exact in float32
    a, opposite = base + tau, base - tau  # cos -1: 1 + cos = 0, the ratio is undefined
    torch.testing.assert_close(model_stock([a, opposite], base), base)
    torch.testing.assert_close(model_stock([a, a, a], base), a)  # parallel: t = 1


def test_needs_base_and_two_models():
    base, (a, b) = _models(2)
    with pytest.raises(ConfigError, match="base"):
        model_stock([a, b], None)
    with pytest.raises(ConfigError, match="at least two"):
        model_stock([a], base)
    with pytest.raises(ConfigError, match="at least 2 models"):
        merge_state_dicts("model_stock", [{"w": a}], {"w": base})


def test_through_state_dicts_with_filter_wise():
    base, (a, b, c) = _models(3, seed=7)
    out = merge_state_dicts(
        "model_stock", [{"w": a}, {"w": b}, {"w": c}], {"w": base}, filter_wise=True
    )["w"]
    torch.testing.assert_close(out, _reference(base, [a, b, c], rowwise=True))


@pytest.mark.parametrize("rowwise", [False, True])
def test_tensor_larger_than_a_chunk(rowwise):
    base, tensors = _models(3, shape=(700, 600), seed=11)
    torch.testing.assert_close(
        model_stock(tensors, base, filter_wise=rowwise), _reference(base, tensors, rowwise)
    )
