import pytest

from modelfuse.errors import ConfigError
from modelfuse.merge.methods.linear import LinearParameters
from modelfuse.merge.methods.task_arithmetic import TaskArithmeticParameters
from modelfuse.merge.parameters import evaluate_setting


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


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            [{"pattern": "self_attn", "value": [0, 1]}, {"value": 0.5}],
            "entry 0 has the key 'pattern'; a filtered setting's entries have the keys filter "
            "and value; mergekit reads no 'pattern' key",
        ),
        ([{"filter": "mlp"}], "entry 0 has no value"),
        ([0.5, {"value": 1.0}], "entry 0 is 0.5; a list holds numbers (a gradient) or {filter, value} entries, not both"),
        ({"a": 1}, "entry 0 has the key 'a'"),
        ([{"value": {"x": 1}}], "entry 0: value must be a number or a list of numbers"),
    ],
)
def test_a_setting_of_no_written_form_is_one_clear_problem(setting, message):
    from modelfuse.errors import ConfigError
    from modelfuse.merge.config import load_config

    config = {"merge_method": "linear", "models": ["a", "b"], "parameters": {"t": setting}}
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    text = str(caught.value)
    assert text.startswith("configuration: parameters.t: ") and message in text
    assert "valid boolean" not in text and text.count(";") <= 3  # one problem, not one per form


@pytest.mark.parametrize(
    "setting",
    [0.5, "x", True, [0, 0.5, 1], [{"filter": "mlp", "value": [0, 1]}, {"value": 0.2}],
     {"filter": "mlp", "value": 0.3}],
)
def test_every_written_form_of_a_setting_is_accepted(setting):
    from modelfuse.merge.config import load_config

    config = {"merge_method": "linear", "models": ["a", "b"], "parameters": {"t": setting}}
    loaded, _ = load_config(config)
    assert loaded.parameters is not None and "t" in loaded.parameters
