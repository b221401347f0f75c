import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge import merge_state_dicts, task_arithmetic


def _random(n, shape=(4, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_matches_formula():
    base, a, b = _random(3)
    w, lam = [0.7, -0.4], 1.3
    expected = base + lam * (w[0] * (a - base) + w[1] * (b - base))
    torch.testing.assert_close(task_arithmetic([a, b], base, weight=w, lambda_=lam), expected)


def test_normalize_divides_by_weight_sum_before_lambda():
    base, a, b = _random(3)
    w, lam = [1.0, 3.0], 0.5
    expected = base + lam * (w[0] * (a - base) + w[1] * (b - base)) / 4.0
    result = task_arithmetic([a, b], base, weight=w, lambda_=lam, normalize=True)
    torch.testing.assert_close(result, expected)


def test_negation_removes_a_skill():
    base, a = _random(2)
    # Adding a task vector and then subtracting it returns the base.
    added = task_arithmetic([a], base, weight=[1.0])
    removed = task_arithmetic([added], base, weight=[0.0])
    torch.testing.assert_close(added, a)
    torch.testing.assert_close(removed, base)
    torch.testing.assert_close(task_arithmetic([a], base, weight=[-1.0]), 2 * base - a)


def test_requires_base():
    with pytest.raises(ConfigError, match="base"):
        task_arithmetic(_random(2), None)


def test_state_dicts_with_lambda_gradient_over_layers():
    base, a = _random(2)
    sds = [{f"layers.{i}.w": a + i for i in range(3)}]
    base_sd = {f"layers.{i}.w": base for i in range(3)}
    out = merge_state_dicts("task_arithmetic", sds, base_sd, **{"lambda": [0.0, 1.0]})
    for i, lam in enumerate([0.0, 0.5, 1.0]):
        torch.testing.assert_close(out[f"layers.{i}.w"], base + lam * (a + i - base))


def test_state_dict_requires_base():
    with pytest.raises(ConfigError, match="needs a base model"):
        merge_state_dicts("task_arithmetic", [{"w": torch.ones(2)}])
