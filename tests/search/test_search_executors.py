"""grid_search and random_search through executors give the serial result."""

from __future__ import annotations

import os

import pytest
import torch

from modelfuse.executors import LocalExecutor, RayExecutor
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


def test_search_on_ray_two_workers() -> None:
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serial = grid_search("task_arithmetic", MODELS, BASE, GRID, _closeness)
        on_ray = grid_search(
            "task_arithmetic", MODELS, BASE, GRID, _closeness, executor=RayExecutor()
        )
        _check_same(serial, on_ray)
    finally:
        ray.shutdown()
