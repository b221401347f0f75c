"""Searches through executors give the serial result; unpicklable scores are refused."""

from __future__ import annotations

import functools
import operator
import pickle
import sys
import types

import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.executors import LocalExecutor
from modelfuse.search import evolutionary_search, greedy_soup, nll_score
from modelfuse.search.parameter_search import grid_search, random_search


def _closeness(state_dict: dict[str, torch.Tensor]) -> float:
    """Minus the distance of w from (2, 1): the best task_arithmetic lambda is 0.5."""
    return -float(torch.linalg.vector_norm(state_dict["w"] - torch.tensor([2.0, 1.0])))


BASE = {"w": torch.tensor([0.0, 0.0])}
MODELS = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 2.0])}]
GRID = {"lambda": [0.25, 0.5, 0.75, 1.0]}


def _check_same(expected, got) -> None:  # type: ignore[no-untyped-def]
    assert got.parameters == expected.parameters
    assert got.score == expected.score
    assert [c.parameters for c in got.trace] == [c.parameters for c in expected.trace]
    assert [c.score for c in got.trace] == [c.score for c in expected.trace]
    torch.testing.assert_close(got.state_dict["w"], expected.state_dict["w"], rtol=0, atol=0)


def test_grid_search_local_executor_equals_serial() -> None:
    serial = grid_search("task_arithmetic", MODELS, BASE, GRID, _closeness)
    # hand-worked: lambda 0.5 gives w = 0.5 * (1, 0) + 0.5 * (3, 2) = (2, 1), score 0
    assert serial.parameters == {"lambda": 0.5}
    assert serial.score == 0.0
    pooled = grid_search(
        "task_arithmetic", MODELS, BASE, GRID, _closeness, executor=LocalExecutor(1)
    )
    _check_same(serial, pooled)


def test_random_search_local_executor_equals_serial() -> None:
    serial = random_search("linear", MODELS, None, _closeness, n_trials=6, seed=3)
    pooled = random_search(
        "linear", MODELS, None, _closeness, n_trials=6, seed=3, executor=LocalExecutor(1)
    )
    _check_same(serial, pooled)


# evolutionary_search and greedy_soup through executors ------------------------------------


def _digits_setup(digits):  # type: ignore[no-untyped-def]
    """Four fine-tuned MLPs and a picklable score (nll_score is a module-level class)."""
    score = nll_score(digits.model, [(digits.x_val, digits.y_val)])
    return list(digits.fine_tuned), score


def _reference_nll(digits, state_dict) -> float:  # type: ignore[no-untyped-def]
    """The mean log-likelihood of the labels, written out: log_softmax of the MLP's logits."""
    hidden = torch.relu(digits.x_val @ state_dict["0.weight"].T + state_dict["0.bias"])
    logits = hidden @ state_dict["2.weight"].T + state_dict["2.bias"]
    log_p = torch.log_softmax(logits, dim=1)
    return float(log_p[torch.arange(len(digits.y_val)), digits.y_val].mean())


def test_evolution_and_greedy_soup_on_two_processes_equal_serial(digits) -> None:  # type: ignore[no-untyped-def]
    models, score = _digits_setup(digits)
    serial = evolutionary_search(models, score, generations=3, population=4, seed=5)
    with LocalExecutor(workers=2) as executor:
        pooled = evolutionary_search(
            models, score, generations=3, population=4, seed=5, executor=executor
        )
    _check_same_all(serial, pooled)
    # independent reference: each traced score is the formula on sum_k w_k theta_k
    for candidate in pooled.trace[:3]:
        combined = {
            name: sum(w * sd[name] for w, sd in zip(candidate.parameters["weights"], models))
            for name in models[0]
        }
        assert candidate.score == pytest.approx(_reference_nll(digits, combined), abs=1e-5)

    soup = greedy_soup(models, score)
    pooled_soup = greedy_soup(models, score, executor=LocalExecutor(workers=2))
    _check_same_all(soup, pooled_soup)
    for i, sd in enumerate(models):
        assert pooled_soup.trace[i].score == pytest.approx(_reference_nll(digits, sd), abs=1e-5)


def _check_same_all(expected, got) -> None:  # type: ignore[no-untyped-def]
    assert got.parameters == expected.parameters
    assert got.score == expected.score
    assert got.trace == expected.trace
    assert list(got.state_dict) == list(expected.state_dict)
    for name in expected.state_dict:
        torch.testing.assert_close(got.state_dict[name], expected.state_dict[name], rtol=0, atol=0)


def test_evolution_generations_reuse_the_worker_processes(digits) -> None:  # type: ignore[no-untyped-def]
    models, score = _digits_setup(digits)
    seen: list[object] = []

    class Recording(LocalExecutor):
        def map(self, function, items):  # type: ignore[no-untyped-def]
            seen.append(function)
            return super().map(function, items)

    result = evolutionary_search(models, score, generations=3, population=4, executor=Recording())
    # one map per generation, the initial mean with generation 1: 5 + 4 + 4 candidates
    assert len(seen) == 3 and all(f is seen[0] for f in seen)
    assert [c.parameters["generation"] for c in result.trace] == [0] + [1] * 4 + [2] * 4 + [3] * 4


def test_unpicklable_score_is_refused_in_one_line() -> None:
    offset = 2.0
    models = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([4.0])}]

    def closure(sd: dict[str, torch.Tensor]) -> float:
        return -abs(float(sd["w"]) - offset)

    for run, what in (
        (
            lambda ex: evolutionary_search(models, closure, generations=1, executor=ex),
            "of checkpoint combinations",
        ),
        (
            lambda ex: greedy_soup(models, closure, executor=ex),
            "of single models",
        ),
        (
            lambda ex: grid_search(
                "linear", models, None, {"weight": [1.0, 2.0]}, closure, executor=ex
            ),
            "of linear merges",
        ),
    ):
        with pytest.raises(ConfigError) as caught:
            run(LocalExecutor(workers=2))
        message = str(caught.value)
        assert "\n" not in message
        # the score's name, cut to 60 characters, and what it scores
        assert message.startswith(
            "LocalExecutor(workers=2): cannot send the score 'test_unpicklable_score_is_refused"
        )
        assert f"{what} to worker processes (" in message
        assert "Can't pickle local object" in message  # pickle's own reason
        assert "module level" in message and "functools.partial" in message
        assert "RayExecutor" in message


def test_function_the_workers_cannot_import_is_refused(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ghost = types.ModuleType("modelfuse_ghost_module")  # importable here, not in a new process
    exec("def twice(v):\n    return 2 * v\n", ghost.__dict__)
    monkeypatch.setitem(sys.modules, "modelfuse_ghost_module", ghost)
    with pytest.raises(ConfigError) as caught:
        LocalExecutor(workers=2).map(ghost.twice, [1, 2, 3])
    message = str(caught.value)
    assert message.startswith(
        "LocalExecutor(workers=2): the worker processes cannot load the function 'twice' "
        "(ModuleNotFoundError: No module named 'modelfuse_ghost_module')"
    )
    assert "\n" not in message and "module level" in message
    # a partial of a module-level function is sent and gives the direct result
    assert LocalExecutor(workers=2).map(functools.partial(operator.mul, 2), [1, 2, 3]) == [2, 4, 6]


def test_a_score_on_slices_pickles_only_its_own_examples() -> None:
    x, y = torch.randn(4000, 50), torch.randint(0, 3, (4000,))
    batches = [(x[i : i + 1000], y[i : i + 1000]) for i in range(0, 4000, 1000)]
    score = nll_score(torch.nn.Linear(50, 3), batches)
    data_bytes = x.numel() * 4 + y.numel() * 8
    # torch pickles a view with its whole storage: four slices would carry x four times
    assert len(pickle.dumps(score)) < 1.1 * data_bytes
    again = pickle.loads(pickle.dumps(score))
    weights = {"weight": torch.randn(3, 50), "bias": torch.zeros(3)}
    assert again(weights) == score(weights)
    assert score.data[0][0].data_ptr() == x.data_ptr()  # the score itself keeps the views
