import itertools

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.search import grid_search, merge_with_settings, random_search

BASE = {"w": torch.tensor([1.0, -1.0]), "n": torch.tensor(5)}
MODELS = [
    {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(5)},
    {"w": torch.tensor([0.0, 3.0]), "n": torch.tensor(5)},
]
TARGET = torch.tensor([1.5, 1.0])


def score(sd):
    return -float(((sd["w"] - TARGET) ** 2).sum())


def task_arithmetic_by_hand(lam, weights):
    return BASE["w"] + lam * sum(w * (m["w"] - BASE["w"]) for w, m in zip(weights, MODELS))


def test_grid_search_tries_the_product_in_order_and_keeps_the_best():
    space = {"lambda": [0.5, 1.0, 2.0], "weight": [0.5, [1.0, 0.25]]}
    result = grid_search("task_arithmetic", MODELS, BASE, space, score)
    combos = list(itertools.product(space["lambda"], space["weight"]))
    assert len(result.trace) == len(combos)
    expected_scores = []
    for cand, (lam, w) in zip(result.trace, combos):
        weights = [w, w] if isinstance(w, float) else w
        assert cand.parameters == {"lambda": lam, "weight": w if isinstance(w, float) else tuple(w)}
        expected_scores.append(
            -float(((task_arithmetic_by_hand(lam, weights) - TARGET) ** 2).sum())
        )
    assert result.scores() == pytest.approx(expected_scores)
    best = int(np.argmax(expected_scores))
    assert result.score == pytest.approx(expected_scores[best])
    lam, w = combos[best]
    weights = [w, w] if isinstance(w, float) else w
    torch.testing.assert_close(result.state_dict["w"], task_arithmetic_by_hand(lam, weights))
    assert result.state_dict["n"].item() == 5


def test_grid_search_with_per_model_weight_vectors_and_fixed_parameters():
    space = {"weight": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]}
    result = grid_search(
        "linear",
        MODELS,
        None,
        space,
        lambda sd: float(sd["w"].sum()),
        parameters={"normalize": False},
    )
    # unnormalised sums: 2, 3 and 5
    assert result.scores() == pytest.approx([2.0, 3.0, 5.0])
    assert result.parameters == {"normalize": False, "weight": (1.0, 1.0)}


def test_unknown_or_clashing_parameters_are_reported():
    with pytest.raises(ConfigError, match="space: unknown parameter 'density'.*valid parameters"):
        grid_search("task_arithmetic", MODELS, BASE, {"density": [0.5]}, score)
    with pytest.raises(ConfigError, match="both searched and fixed"):
        grid_search("linear", MODELS, None, {"weight": [1.0]}, score, parameters={"weight": 2.0})
    with pytest.raises(ConfigError, match="unknown merge method 'nope'"):
        grid_search("nope", MODELS, None, {}, score)
    with pytest.raises(ConfigError, match="3 values for 2 models"):
        merge_with_settings("linear", MODELS, None, {"weight": [1, 2, 3]})


def test_random_search_draws_dirichlet_weights_from_the_seed():
    result = random_search(
        "task_arithmetic",
        MODELS,
        BASE,
        score,
        n_trials=15,
        space={"lambda": [0.5, 1.0, 1.5]},
        concentration=2.0,
        seed=3,
    )
    rng = np.random.default_rng(3)
    for cand in result.trace:
        expected_w = rng.dirichlet([2.0, 2.0])
        expected_lam = [0.5, 1.0, 1.5][int(rng.integers(3))]
        assert cand.parameters["weight"] == pytest.approx(tuple(expected_w))
        assert cand.parameters["lambda"] == expected_lam
        merged = task_arithmetic_by_hand(expected_lam, expected_w)
        assert cand.score == pytest.approx(-float(((merged - TARGET) ** 2).sum()), rel=1e-6)
    assert result.score == max(result.scores())
    again = random_search(
        "task_arithmetic",
        MODELS,
        BASE,
        score,
        n_trials=15,
        space={"lambda": [0.5, 1.0, 1.5]},
        concentration=2.0,
        seed=3,
    )
    assert again.trace == result.trace


def test_random_search_on_digits_beats_or_matches_the_uniform_soup(digits):
    from modelfuse.search import accuracy_score, uniform_soup

    score_val = accuracy_score(digits.model, [(digits.x_val, digits.y_val)])
    result = random_search("linear", digits.fine_tuned, None, score_val, n_trials=6, seed=0)
    assert sum(result.parameters["weight"]) == pytest.approx(1.0)
    expected = {
        k: sum(w * sd[k] for w, sd in zip(result.parameters["weight"], digits.fine_tuned))
        for k in digits.base
    }
    for k in expected:
        torch.testing.assert_close(result.state_dict[k], expected[k])
    assert result.score == score_val(expected)
    assert result.score >= min(result.scores())
    assert score_val(uniform_soup(digits.fine_tuned)) > 0.9
