"""Early-exit cascade against a per-sample loop written out in the test."""

from __future__ import annotations

import numpy as np
import pytest

from modelfuse.ensemble.cascade import early_exit_cascade
from modelfuse.errors import ConfigError


def _loop(p, threshold, window, costs, running):
    exits, out, spent = [], [], []
    for i in range(p.shape[1]):
        for k in range(p.shape[0]):
            stage = p[: k + 1, i].mean(axis=0) if running else p[k, i]
            if p.shape[2] == 2:
                certain = abs(stage[1] - threshold) > window
            else:
                certain = stage.max() > threshold + window
            if certain or k == p.shape[0] - 1:
                exits.append(k)
                out.append(stage)
                spent.append(sum(costs[: k + 1]))
                break
    return np.array(exits), np.array(out), 1 - np.mean(spent) / sum(costs)


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("combine", ["running", "member"])
def test_matches_a_per_sample_loop(n_classes: int, combine: str) -> None:
    rng = np.random.default_rng(n_classes)
    p = rng.dirichlet(np.ones(n_classes) * 0.7, size=(3, 200))
    costs = [1.0, 2.0, 4.0]
    result = early_exit_cascade(
        p, kind="probabilities", threshold=0.5, window=0.2, costs=costs, combine=combine
    )
    exits, out, saved = _loop(p, 0.5, 0.2, costs, combine == "running")
    np.testing.assert_array_equal(result.exit_stage, exits)
    np.testing.assert_allclose(result.probabilities, out)
    assert result.compute_saved == pytest.approx(saved)
    np.testing.assert_allclose(result.share_per_stage, np.bincount(exits, minlength=3) / 200)
    assert result.share_per_stage.sum() == pytest.approx(1.0)


def test_window_extremes() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(2), size=(3, 50))
    everyone_waits = early_exit_cascade(p, kind="probabilities", window=0.5)
    assert everyone_waits.compute_saved == 0.0
    np.testing.assert_allclose(everyone_waits.probabilities, p.mean(axis=0))
    p[0, :, 1] = np.where(p[0, :, 1] == 0.5, 0.6, p[0, :, 1])
    p[0, :, 0] = 1 - p[0, :, 1]
    nobody_waits = early_exit_cascade(p, kind="probabilities", window=0.0)
    assert nobody_waits.compute_saved == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="window"):
        early_exit_cascade(p, kind="probabilities", window=-0.1)
    with pytest.raises(ConfigError, match="costs"):
        early_exit_cascade(p, kind="probabilities", costs=[1, 2])
