"""Saved calibrators: every malformed value is one ConfigError naming its key."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest

from modelfuse.calibration import calibrator_from_json, make_calibrator
from modelfuse.calibration.saved import saved_array, saved_integer, saved_number
from modelfuse.errors import ConfigError


def _saved(method: str, k: int = 3) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, size=(300, k))
    labels = rng.integers(0, k, size=300)
    cal = make_calibrator(method, kind="logits").fit(logits, labels)
    return json.loads(json.dumps(cal.to_json()))


def _refused(saved: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        calibrator_from_json(saved)
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def _with(saved: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(saved)
    *parents, last = path.split(".")
    target = changed
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return changed


_DELETE = object()


@pytest.mark.parametrize(
    ("method", "path", "value", "message"),
    [
        ("temperature", "method", _DELETE, '"method": missing'),
        ("temperature", "method", ["temperature"], "\"method\": unknown ['temperature']"),
        ("temperature", "params", _DELETE, '"params": missing'),
        ("temperature", "params", [], '"params": expected an object, got a list'),
        ("temperature", "params.kind", _DELETE, '"params.kind": missing'),
        ("temperature", "params.kind", "logit", "\"params.kind\": expected one of 'probabilities'"),
        ("temperature", "params.max_iter", "500", '"params.max_iter": expected an integer'),
        ("temperature", "params.tol", 1e-3, '"params.tol": unknown parameter of temperature'),
        ("temperature", "state", _DELETE, '"state": missing'),
        ("temperature", "state.n_classes_", "3", '"state.n_classes_": expected an integer'),
        ("temperature", "state.n_classes_", 10**30, '"state.n_classes_": expected an integer'),
        ("temperature", "state.temperature_", _DELETE, '"state.temperature_": missing'),
        ("temperature", "state.temperature_", float("nan"), '"state.temperature_": expected a'),
        ("temperature", "state.temperature_", float("inf"), '"state.temperature_": expected a'),
        ("temperature", "state.temperature_", -1.0, '"state.temperature_": expected a'),
        ("temperature", "state.temperature_", "2.0", '"state.temperature_": expected a'),
        ("vector", "params.reg", -1, '"params.reg": expected a finite number in [0, inf]'),
        ("vector", "state.coef_", "1,2,3", '"state.coef_": expected a list of numbers'),
        ("vector", "state.coef_", {"a": 1}, '"state.coef_": expected a list of numbers'),
        ("vector", "state.coef_", [1.0, 2.0], '"state.coef_": expected shape (3,), got (2,)'),
        ("vector", "state.coef_", [1.0, "x", 2.0], '"state.coef_": expected a list of numbers'),
        ("vector", "state.coef_", [1.0, None, 2.0], '"state.coef_": expected a list of numbers'),
        ("vector", "state.coef_", [1.0, True, 2.0], '"state.coef_": expected a list of numbers'),
        ("vector", "state.coef_", [1, [2], 3], '"state.coef_": expected a list of numbers'),
        ("vector", "state.intercept_", [0, float("nan"), 0], '"state.intercept_": holds NaN'),
        ("matrix", "state.coef_", [[1, 0, 0], [0, 1, 0]], '"state.coef_": expected shape (3, 3)'),
        ("matrix", "state.coef_", [1, 0, 0], '"state.coef_": expected shape (3, 3), got (3,)'),
        ("platt", "params.smoothing", 1, '"params.smoothing": expected true or false'),
        ("platt", "state.coef_", [1.0], '"state.coef_": expected shape (3,), got (1,)'),
        (
            "isotonic",
            "state.x_thresholds_",
            [[0, 1]],
            '"state.x_thresholds_": expected a list of 3',
        ),
        (
            "isotonic",
            "state.x_thresholds_",
            {"a": 1},
            '"state.x_thresholds_": expected a list of 3',
        ),
        ("histogram", "params.n_bins", 10**9, '"params.n_bins": expected an integer in [1, 10000]'),
        ("histogram", "params.n_bins", 14, '"state.edges_[0]": expected shape (15,), got (16,)'),
        ("histogram", "params.binning", "log", "\"params.binning\": expected one of 'uniform'"),
        ("histogram", "params.prior_strength", 0, '"params.prior_strength": expected a finite'),
        ("histogram", "state.values_", [[0.5] * 15] * 2, '"state.values_": expected a list of 3'),
    ],
)
def test_malformed_saved_calibrators(method: str, path: str, value: Any, message: str) -> None:
    _refused(_with(_saved(method), path, value), message)


def test_malformed_values_inside_lists_of_maps() -> None:
    saved = _saved("isotonic")
    saved["state"]["x_thresholds_"][1]["array"] = [0.5, 0.2]
    saved["state"]["y_thresholds_"][1]["array"] = [0.1, 0.9]
    _refused(saved, '"state.x_thresholds_[1]": expected non-decreasing values')
    saved = _saved("isotonic")
    saved["state"]["y_thresholds_"][2]["array"] = saved["state"]["y_thresholds_"][2]["array"][:-1]
    _refused(saved, '"state.y_thresholds_[2]": expected')
    saved = _saved("histogram")
    saved["state"]["values_"][0]["array"][3] = 1.5
    _refused(saved, '"state.values_[0]": expected values in [0, 1], got values in [')
    saved = _saved("histogram")
    saved["state"]["edges_"][2]["dtype"] = "object"
    _refused(saved, "\"state.edges_[2].dtype\": expected one of 'float64'")


def test_classes_out_of_range_and_not_an_object() -> None:
    _refused([1, 2], '"calibrator": expected an object, got a list')
    _refused(_with(_saved("temperature"), "state.n_classes_", 1), '"state.n_classes_": expected')
    matrix = _with(_saved("matrix"), "state.n_classes_", 2000)
    _refused(matrix, "matrix scaling takes at most 1000 classes, got 2000")


def test_a_well_formed_file_round_trips_for_every_method() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 3))
    for method in ("temperature", "vector", "matrix", "platt", "isotonic", "histogram"):
        saved = _saved(method)
        cal = calibrator_from_json(saved)
        again = calibrator_from_json(json.loads(json.dumps(cal.to_json())))
        np.testing.assert_array_equal(again.predict_proba(logits), cal.predict_proba(logits))


def test_messages_shorten_long_values() -> None:
    saved = _with(_saved("temperature"), "method", "x" * 10_000)
    with pytest.raises(ConfigError) as info:
        calibrator_from_json(saved)
    assert len(str(info.value)) < 200


def test_value_checks() -> None:
    assert saved_integer(np.int64(4), "k", low=1, high=5) == 4
    with pytest.raises(ConfigError, match='"k": expected an integer in \\[1, 5\\], got 4.0'):
        saved_integer(4.0, "k", low=1, high=5)
    with pytest.raises(ConfigError, match='"k": expected an integer'):
        saved_integer(True, "k", low=0, high=5)
    assert saved_number(3, "x") == 3.0
    with pytest.raises(ConfigError, match='"x": expected a finite number in \\(0, inf\\]'):
        saved_number(0.0, "x", low=0.0, open_low=True)
    np.testing.assert_array_equal(
        saved_array({"array": [[1, 2]], "dtype": "float64"}, "a", shape=(1, None)), [[1.0, 2.0]]
    )
    with pytest.raises(ConfigError, match='"a": expected shape \\(1, n\\), got \\(1, 0\\)'):
        saved_array([[]], "a", shape=(1, None))
