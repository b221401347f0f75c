import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge import linear, merge_state_dicts


def _random(n, shape=(5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_weighted_average_matches_formula():
    tensors = _random(3)
    w = [0.2, 1.5, -0.3]
    expected = (w[0] * tensors[0] + w[1] * tensors[1] + w[2] * tensors[2]) / sum(w)
    torch.testing.assert_close(linear(tensors, weight=w), expected, rtol=1e-6, atol=1e-6)


def test_unnormalized_is_weighted_sum():
    tensors = _random(2)
    expected = 0.25 * tensors[0] + 0.5 * tensors[1]
    result = linear(tensors, weight=[0.25, 0.5], normalize=False)
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)


def test_equal_weights_by_default_and_one_model_is_identity():
    tensors = _random(4)
    torch.testing.assert_close(linear(tensors), torch.stack(tensors).mean(0))
    torch.testing.assert_close(linear(tensors[:1]), tensors[0])


def test_low_precision_inputs_accumulate_in_float32():
    tensors = [t.to(torch.bfloat16) for t in _random(3)]
    result = linear(tensors, weight=[1.0, 2.0, 3.0])
    assert result.dtype == torch.float32
    exact = sum(w * t.double() for w, t in zip([1.0, 2.0, 3.0], tensors)) / 6.0
    torch.testing.assert_close(result.double(), exact, rtol=1e-6, atol=1e-6)


def test_inputs_are_not_modified():
    tensors = _random(2)
    copies = [t.clone() for t in tensors]
    linear(tensors, weight=[1.0, 3.0])
    for t, c in zip(tensors, copies):
        assert torch.equal(t, c)


def test_weights_summing_to_zero_raise():
    with pytest.raises(ConfigError, match="sum to 0"):
        linear(_random(2), weight=[1.0, -1.0])


def test_wrong_number_of_weights_raises():
    with pytest.raises(ConfigError, match="2 weights for 3 models"):
        linear(_random(3), weight=[1.0, 1.0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_state_dicts_in_low_precision_within_rounding(dtype):
    sds = [{"w": t} for t in _random(3)]
    out = merge_state_dicts("linear", sds, weights=[1, 1, 2], dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    assert out["w"].dtype == torch_dtype
    rounded = [sd["w"].to(torch_dtype).float() for sd in sds]
    expected = ((rounded[0] + rounded[1] + 2 * rounded[2]) / 4).to(torch_dtype)
    torch.testing.assert_close(out["w"], expected, rtol=0, atol=0)
