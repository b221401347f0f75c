import pytest

from modelfuse.errors import ConfigError
from modelfuse.merge.linear import LinearParameters
from modelfuse.merge.parameters import evaluate_setting
from modelfuse.merge.task_arithmetic import TaskArithmeticParameters


def test_scalar_is_returned_as_is():
    assert evaluate_setting(0.3, "any", 0.7) == 0.3
    assert evaluate_setting(True, "any", 0.7) is True


@pytest.mark.parametrize(
    ("t", "expected"),
    [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.75, 0.5), (1.0, 0.0)],
)
def test_gradient_is_interpolated_piecewise_linearly(t, expected):
    # Three anchors at t = 0, 0.5, 1 with values 0, 1, 0.
    assert evaluate_setting([0.0, 1.0, 0.0], "x", t) == pytest.approx(expected)


def test_filters_first_match_wins_and_fallback():
    setting = [
        {"filter": "self_attn", "value": 0.1},
        {"filter": "attn", "value": 0.2},
        {"value": [0.0, 1.0]},
    ]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.1
    assert evaluate_setting(setting, "model.layers.0.cross_attn.weight", 0.5) == 0.2
    assert evaluate_setting(setting, "model.layers.0.mlp.weight", 0.5) == pytest.approx(0.5)


def test_filters_without_fallback_give_none():
    assert evaluate_setting([{"filter": "mlp", "value": 1.0}], "attn.weight", 0.0) is None


def test_bad_setting_raises():
    with pytest.raises(ConfigError, match="not a number"):
        evaluate_setting(object(), "x", 0.0)


def test_declarations_split_per_model_and_global():
    assert LinearParameters.per_model_fields() == ("weight",)
    assert LinearParameters.global_fields() == ("normalize",)
    assert TaskArithmeticParameters.config_name("lambda_") == "lambda"
    assert TaskArithmeticParameters.field_for("lambda") == "lambda_"
    assert TaskArithmeticParameters.field_for("density") is None
    rows = {row[0]: row for row in TaskArithmeticParameters.describe()}
    assert rows["weight"][1] == "per model" and rows["lambda"][2] == "1.0"
