import pytest
import torch

from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.merge import merge_state_dicts
from modelfuse.merge.plan import layer_position


def test_layer_positions_follow_mergekit():
    """mergekit 0.1.5 reads every tensor outside the numbered layers at t = 0."""
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
    assert [pos[n] for n in names] == [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 0.0, 0.0]


def _tiny_llama_state(value: float) -> dict[str, torch.Tensor]:
    """Llama tensor names, three layers, every entry ``value``."""
    state = {"model.embed_tokens.weight": torch.full((5, 2), value)}
    for layer in range(3):
        state[f"model.layers.{layer}.mlp.down_proj.weight"] = torch.full((2, 2), value)
        state[f"model.layers.{layer}.input_layernorm.weight"] = torch.full((2,), value)
    state["model.norm.weight"] = torch.full((2,), value)
    state["lm_head.weight"] = torch.full((5, 2), value)
    return state


def test_a_gradient_gives_every_tensor_outside_the_layers_its_first_value():
    """linear with weight [0, 1] on a and [1, 0] on b: the merge is w_a * 1 + w_b * 3 over
    w_a + w_b; at t = 0 that is b's 3 for the embeddings, final norm and head alike."""
    a, b = _tiny_llama_state(1.0), _tiny_llama_state(3.0)
    out = merge_state_dicts(
        "linear", [a, b], model_parameters=[{"weight": [0.0, 1.0]}, {"weight": [1.0, 0.0]}]
    )
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(out[name], torch.full_like(a[name], 3.0), rtol=0, atol=0)
    # Layers 0, 1, 2 at t = 0, 1/2, 1: weights (0, 1), (1/2, 1/2), (1, 0).
    for layer, expected in enumerate([3.0, 2.0, 1.0]):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        torch.testing.assert_close(out[name], torch.full((2, 2), expected), rtol=0, atol=0)


def test_a_global_gradient_outside_the_layers_on_task_arithmetic():
    """lambda [0.5, 2]: the head and final norm get 0.5 (mergekit's t = 0), layer 2 gets 2."""
    base, tuned = _tiny_llama_state(1.0), _tiny_llama_state(3.0)
    out = merge_state_dicts("task_arithmetic", [tuned], base, **{"lambda": [0.5, 2.0]})
    for name in ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(out[name], torch.full_like(base[name], 1.0 + 0.5 * 2.0))
    torch.testing.assert_close(
        out["model.layers.2.mlp.down_proj.weight"], torch.full((2, 2), 1.0 + 2.0 * 2.0)
    )


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
    """A name no mergekit method reads (a misspelling) is an error, as it is for every method."""
    with pytest.raises(ConfigError, match="unknown parameter 'densty'.*valid parameters: weight, normalize"):
        merge_state_dicts("linear", [{"x": torch.ones(1)}], densty=0.5)
    with pytest.raises(ConfigError, match="unknown parameter 'colour' for merge method 'fisher'"):
        merge_state_dicts("fisher", [{"x": torch.ones(1)}], fishers=[{"x": torch.ones(1)}], colour=1)


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
