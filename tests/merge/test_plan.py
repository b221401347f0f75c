import pytest
import torch

from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.plan import layer_position


def test_layer_positions_follow_mergekit():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.mlp.weight",
        "model.layers.1.mlp.weight",
        "model.layers.2.mlp.weight",
        "model.layers.3.mlp.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    pos = layer_position(names)
    assert [pos[n] for n in names] == [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]


def test_all_mismatches_reported_together():
    a = {"x": torch.zeros(2, 3), "y": torch.zeros(4), "z": torch.zeros(1)}
    b = {"x": torch.zeros(3, 2), "y": torch.zeros(4, dtype=torch.int64), "w": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        merge_state_dicts("linear", [a, b])
    message = str(info.value)
    assert "4 problems" in message
    assert "tensor x has shape [2, 3] in model 0 but [3, 2] in model 1" in message
    assert "tensor y is torch.float32 in model 0 but torch.int64 in model 1" in message
    assert "tensor z is in model 0 but missing from model 1" in message
    assert "tensor w is in model 1 but missing from model 0" in message


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown parameter 'density'.*valid parameters: weight, normalize"):
        merge_state_dicts("linear", [{"x": torch.ones(1)}], density=0.5)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown merge method 'soup'; valid methods: .*linear"):
        merge_state_dicts("soup", [{"x": torch.ones(1)}])


def test_invalid_value_names_model_and_tensor():
    with pytest.raises(ConfigError, match="model 1: tensor x: weight"):
        merge_state_dicts(
            "linear",
            [{"x": torch.ones(1)}, {"x": torch.ones(1)}],
            model_parameters=[{}, {"weight": "heavy"}],
        )


def test_non_float_tensors_are_copied_from_the_reference():
    a = {"ids": torch.tensor([1, 2, 3]), "w": torch.ones(2)}
    b = {"ids": torch.tensor([7, 8, 9]), "w": torch.zeros(2)}
    out = merge_state_dicts("linear", [a, b])
    assert torch.equal(out["ids"], a["ids"])
    assert out["ids"].data_ptr() != a["ids"].data_ptr()


def test_statistics_given_to_a_method_that_does_not_use_them():
    sd = {"w": torch.ones(2)}
    with pytest.raises(ConfigError, match="does not use statistics"):
        merge_state_dicts("linear", [sd], fishers=[sd])


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"weights": [1.0, float("nan")]}, "weight"),
        ({"model_parameters": [{}, {"weight": float("inf")}]}, "weight"),
    ],
)
def test_non_finite_values_in_python_are_refused(kwargs, key):
    with pytest.raises(ConfigError, match=f"{key}: Input should be a finite number"):
        merge_state_dicts("linear", [{"x": torch.ones(1)}, {"x": torch.ones(1)}], **kwargs)


def test_non_finite_global_value_in_python_is_refused():
    base = {"x": torch.zeros(2)}
    with pytest.raises(ConfigError, match="lambda: Input should be a finite number"):
        merge_state_dicts("task_arithmetic", [{"x": torch.ones(2)}], base, **{"lambda": float("nan")})


def test_slerp_takes_two_models_with_the_base_counted():
    x = {"x": torch.ones(2)}
    with pytest.raises(ConfigError, match="'slerp' takes exactly 2 models, the base_model counted; "
                       "got 2 and a base_model"):
        merge_state_dicts("slerp", [x, x], x, t=0.5)
    with pytest.raises(ConfigError, match="got 1 and no base_model"):
        merge_state_dicts("slerp", [x], t=0.5)
