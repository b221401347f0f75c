"""The saved (JSON) form of array ensembles applies exactly what was fitted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from modelfuse.ensemble.saved import apply_ensemble, fit_ensemble
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
