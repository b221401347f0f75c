"""Tests of modelfuse.executors: local processes and a local Ray instance."""

from __future__ import annotations

import math
import operator
import os
import sys

import pytest

from modelfuse.errors import ConfigError
from modelfuse.executors import LocalExecutor, RayExecutor, resolve_executor


def _square(value: int) -> int:
    return value * value


def _fails_on_three(value: int) -> int:
    if value == 3:
        raise ValueError("three is refused")
    return value


def test_local_one_worker_matches_list_comprehension() -> None:
    items = [3, -1, 4, 1, -5]
    assert LocalExecutor().map(_square, items) == [9, 1, 16, 1, 25]


def test_local_processes_keep_order() -> None:
    # spawned processes import the function by name: a standard-library one
    items = list(range(7, -3, -1))
    assert LocalExecutor(workers=2).map(operator.neg, items) == [-v for v in items]


def test_error_names_the_item() -> None:
    with pytest.raises(ValueError, match=r"item 2 \(3\): three is refused"):
        LocalExecutor(workers=1).map(_fails_on_three, [1, 2, 3, 4])


def test_error_names_the_item_in_processes() -> None:
    with pytest.raises(ValueError, match=r"item 2 \(-1.0\): math domain error"):
        LocalExecutor(workers=2).map(math.sqrt, [4.0, 9.0, -1.0, 16.0])


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_bad_worker_count_is_refused(workers: object) -> None:
    with pytest.raises(ConfigError, match="workers: expected a positive integer"):
        LocalExecutor(workers=workers).map(_square, [1])  # type: ignore[arg-type]


def test_resolve_executor() -> None:
    assert isinstance(resolve_executor(None), LocalExecutor)
    with pytest.raises(ConfigError, match="executor: expected an object with a map"):
        resolve_executor(object())  # type: ignore[arg-type]


def test_ray_executor_two_workers() -> None:
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        executor = RayExecutor()
        assert executor.map(_square, [2, -3, 5]) == [4, 9, 25]
        with pytest.raises(ValueError, match=r"item 2 \(3\): three is refused"):
            executor.map(_fails_on_three, [1, 2, 3])
    finally:
        ray.shutdown()


def test_ray_executor_without_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigError) as caught:
        RayExecutor().map(_square, [1])
    assert str(caught.value) == (
        "RayExecutor needs Ray, which is not installed; install it with "
        "pip install 'modelfuse[ray]', or use LocalExecutor"
    )

