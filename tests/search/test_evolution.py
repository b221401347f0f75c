import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.search import evolutionary_search

rng = np.random.default_rng(0)
CHECKPOINTS = [{"w": torch.tensor(rng.normal(size=6), dtype=torch.float32)} for _ in range(3)]
TRUE_W = np.array([0.2, -0.5, 1.1])
TARGET = sum(w * sd["w"] for w, sd in zip(TRUE_W, CHECKPOINTS))


def score(sd):
    return -float(((sd["w"] - TARGET) ** 2).sum())


def test_recovers_known_coefficients_of_a_quadratic_score():
    result = evolutionary_search(CHECKPOINTS, score, generations=80, seed=1)
    np.testing.assert_allclose(result.parameters["weights"], TRUE_W, atol=1e-2)
    expected = sum(w * sd["w"] for w, sd in zip(result.parameters["weights"], CHECKPOINTS))
    torch.testing.assert_close(result.state_dict["w"], expected)
    assert result.score == max(result.scores())


def test_trace_starts_at_the_uniform_average_and_is_seeded():
    a = evolutionary_search(CHECKPOINTS, score, generations=3, population=5, seed=7)
    assert len(a.trace) == 1 + 3 * 5
    assert a.trace[0].parameters == {"weights": (1 / 3, 1 / 3, 1 / 3), "generation": 0}
    uniform = sum(sd["w"] for sd in CHECKPOINTS) / 3
    assert a.trace[0].score == pytest.approx(-float(((uniform - TARGET) ** 2).sum()), rel=1e-6)
    assert [c.parameters["generation"] for c in a.trace[1:]] == [1] * 5 + [2] * 5 + [3] * 5
    b = evolutionary_search(CHECKPOINTS, score, generations=3, population=5, seed=7)
    c = evolutionary_search(CHECKPOINTS, score, generations=3, population=5, seed=8)
    assert a.trace == b.trace
    assert a.trace != c.trace


def test_bad_settings_raise():
    with pytest.raises(ConfigError, match="init: expected 3"):
        evolutionary_search(CHECKPOINTS, score, init=[1.0, 0.0])
    with pytest.raises(ConfigError, match="population"):
        evolutionary_search(CHECKPOINTS, score, population=1)
