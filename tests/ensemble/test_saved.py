"""The saved (JSON) form of array ensembles applies exactly what was fitted."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from modelfuse.ensemble.saved import apply_ensemble, check_saved_ensemble, fit_ensemble
from modelfuse.ensemble.stacking import stacking_features
from modelfuse.errors import ConfigError, DataError


def _library(k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=300)
    logits = (
        rng.normal(size=(3, 300, k)) + np.eye(k)[labels] * np.array([2.0, 1.0, 0.2])[:, None, None]
    )
    return logits, labels


@pytest.mark.parametrize("method", ["soft", "learned", "caruana", "stacking"])
@pytest.mark.parametrize("k", [2, 4])
def test_round_trip_through_json(method: str, k: int) -> None:
    logits, labels = _library(k)
    saved, validation = fit_ensemble(logits, labels, kind="logits", method=method, random_state=0)
    again = json.loads(json.dumps(saved))
    applied = apply_ensemble(again, logits)
    np.testing.assert_allclose(applied.sum(axis=1), 1.0)
    if method == "stacking":
        # the saved meta-learner gives what sklearn's fitted one gives
        from sklearn.linear_model import LogisticRegression

        features = stacking_features(logits, "logits")
        meta = LogisticRegression(max_iter=1000).fit(features, labels)
        np.testing.assert_allclose(applied, meta.predict_proba(features), atol=1e-10)
        assert not np.allclose(validation, applied)  # validation rows are out-of-fold
    else:
        np.testing.assert_allclose(applied, validation)
        assert sum(again["weights"]) == pytest.approx(1.0)


def test_apply_checks_the_members() -> None:
    logits, labels = _library(3)
    saved, _ = fit_ensemble(logits, labels, kind="logits", method="learned")
    with pytest.raises(DataError, match="expects 3 models"):
        apply_ensemble(saved, logits[:2])
    with pytest.raises(ConfigError, match="not a modelfuse ensemble"):
        apply_ensemble({"method": "soft"}, logits)
    with pytest.raises(ConfigError, match="unknown 'vote'"):
        fit_ensemble(logits, labels, kind="logits", method="vote")
    with pytest.raises(ConfigError, match="labels"):
        fit_ensemble(logits, None, kind="logits", method="caruana")


@functools.cache
def _saved_text(method: str) -> str:
    logits, labels = _library(3)
    saved, _ = fit_ensemble(
        logits, labels, kind="logits", method=method, random_state=0, members=["a", "b", "c"]
    )
    return json.dumps(saved)


def _saved(method: str) -> dict:
    return json.loads(_saved_text(method))  # a fresh copy each time


_DELETE = object()


@pytest.mark.parametrize(
    ("method", "key", "value", "message"),
    [
        ("soft", "format", _DELETE, "not a modelfuse ensemble"),
        ("soft", "version", 2, '"version": expected one of 1, got 2'),
        ("soft", "method", _DELETE, '"method": missing'),
        ("soft", "method", "vote", "\"method\": expected one of 'soft', 'learned'"),
        ("soft", "kind", "logit", "\"kind\": expected one of 'probabilities', 'logits'"),
        ("soft", "n_models", "3", '"n_models": expected an integer in [1, 100000]'),
        ("soft", "n_models", 10**20, '"n_models": expected an integer in [1, 100000]'),
        ("soft", "n_classes", 3.0, '"n_classes": expected an integer'),
        ("soft", "weights", _DELETE, '"weights": missing'),
        ("soft", "weights", "0.2,0.3,0.5", '"weights": expected a list of numbers, got a string'),
        ("soft", "weights", {"a": 1}, '"weights": expected a list of numbers, got an object'),
        ("soft", "weights", [0.5, 0.5], '"weights": expected shape (3,), got (2,)'),
        ("soft", "weights", [0.5, float("nan"), 0.5], '"weights": holds NaN or infinite values'),
        ("soft", "weights", [0.5, float("inf"), 0.5], '"weights": holds NaN or infinite values'),
        ("soft", "weights", [0.5, -0.5, 1.0], '"weights": expected values in [0, inf]'),
        ("soft", "weights", [0, 0, 0], '"weights": expected a positive sum'),
        ("soft", "average", "geometric", "\"average\": expected one of 'probabilities'"),
        ("soft", "stacking", {}, '"stacking": expected null for method soft'),
        ("soft", "members", ["a", "b"], '"members": expected a list of 3 names'),
        ("soft", "members", "abc", '"members": expected a list of 3 names'),
        ("stacking", "weights", [1, 1, 1], '"weights": expected null for stacking'),
        ("stacking", "stacking", None, '"stacking": expected an object, got null'),
    ],
)
def test_malformed_saved_ensembles(method: str, key: str, value, message: str) -> None:
    saved = _saved(method)
    if value is _DELETE:
        del saved[key]
    else:
        saved[key] = value
    with pytest.raises(ConfigError) as info:
        check_saved_ensemble(saved)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("features", "logits", "\"stacking.features\": expected one of 'probabilities'"),
        ("classes", [0, 1, 3], '"stacking.classes": expected values in [0, 2]'),
        ("classes", [0, -1, 2], '"stacking.classes": expected values in [0, 2]'),
        ("classes", [0, 2, 1], '"stacking.classes": expected at least two increasing integers'),
        ("classes", [0, 0.5, 2], '"stacking.classes": expected at least two increasing integers'),
        ("classes", [1], '"stacking.classes": expected at least two increasing integers'),
        ("coef", [[0.0] * 9] * 2, '"stacking.coef": expected shape (3, 9), got (2, 9)'),
        ("coef", [[0.0] * 8] * 3, '"stacking.coef": expected shape (3, 9), got (3, 8)'),
        ("coef", "[[0]]", '"stacking.coef": expected a list of numbers, got a string'),
        ("intercept", [0.0, float("nan"), 0.0], '"stacking.intercept": holds NaN'),
        ("intercept", _DELETE, '"stacking.intercept": missing'),
    ],
)
def test_malformed_saved_stacking(key: str, value, message: str) -> None:
    saved = _saved("stacking")
    if value is _DELETE:
        del saved["stacking"][key]
    else:
        saved["stacking"][key] = value
    with pytest.raises(ConfigError) as info:
        apply_ensemble(saved, _library(3)[0])
    assert message in str(info.value), str(info.value)


def test_members_are_saved_and_counted() -> None:
    assert _saved("learned")["members"] == ["a", "b", "c"]
    logits, labels = _library(3)
    with pytest.raises(ConfigError, match="members: 2 names for 3 models"):
        fit_ensemble(logits, labels, kind="logits", method="soft", members=["a", "b"])


def test_stacking_refuses_labels_of_one_class() -> None:
    logits, _ = _library(3)
    with pytest.raises(DataError, match="only class 2 occurs; stacking fits a classifier"):
        fit_ensemble(logits, np.full(300, 2), kind="logits", method="stacking")


def test_non_finite_fitted_weights_are_refused(monkeypatch) -> None:
    import modelfuse.ensemble.saved as saved_module

    monkeypatch.setattr(saved_module, "learn_weights", lambda p, y, kind: np.full(3, np.nan))
    logits, labels = _library(3)
    with pytest.raises(DataError, match="learned ensemble: the fit gave non-finite weights"):
        fit_ensemble(logits, labels, kind="logits", method="learned")
