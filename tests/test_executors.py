"""Tests of modelfuse.executors: local processes and a local Ray instance."""

from __future__ import annotations

import math
import multiprocessing
import operator
import os
import signal
import sys
import time
from collections.abc import Callable

import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.executors import ExecutorError, LocalExecutor, RayExecutor, resolve_executor
from modelfuse.search import (
    SearchResult,
    evolutionary_search,
    greedy_soup,
    grid_search,
    random_search,
)
from modelfuse.statistics import fisher_diagonal, gram_matrices, sharded_statistics


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


def _state(values: list[float]) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values), "steps": torch.tensor([3])}


def test_ray_two_workers_runs_searches_and_statistics() -> None:
    """One local Ray instance with 2 CPUs: the executor, every search and sharded statistics."""
    ray = pytest.importorskip("ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    target = torch.tensor([2.0, 1.0])
    models = [_state([1.0, 0.0]), _state([3.0, 2.0]), _state([0.0, 4.0]), _state([2.5, 0.5])]
    base = _state([0.0, 0.0])

    def closeness(sd: dict[str, torch.Tensor]) -> float:  # a closure: Ray sends those
        return -float(torch.linalg.vector_norm(sd["w"] - target))

    searches: dict[str, Callable[[object], SearchResult]] = {
        "grid": lambda ex: grid_search(
            "task_arithmetic", models[:2], base, {"lambda": [0.25, 0.5, 1.0]}, closeness,
            executor=ex,
        ),
        "random": lambda ex: random_search(
            "linear", models, None, closeness, n_trials=6, seed=3, executor=ex
        ),
        "evolution": lambda ex: evolutionary_search(
            models, closeness, generations=3, population=4, seed=2, executor=ex
        ),
        "soup": lambda ex: greedy_soup(models, closeness, executor=ex),
    }
    serial = {name: run(None) for name, run in searches.items()}
    # hand-worked: lambda 0.5 gives 0.5 * (1, 0) + 0.5 * (3, 2) = (2, 1), the target
    assert serial["grid"].parameters == {"lambda": 0.5} and serial["grid"].score == 0.0

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    shards = [[(x[:7], y[:7])], [(x[7:12], y[7:12]), (x[12:20], y[12:20])], [(x[20:], y[20:])]]
    whole = {
        "fisher": fisher_diagonal(network, [(x, y)]),
        "gram": gram_matrices(network, [(x, y)]),
    }

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        executor = RayExecutor()
        assert executor.map(_square, [2, -3, 5]) == [4, 9, 25]
        with pytest.raises(ValueError, match=r"item 2 \(3\): three is refused"):
            executor.map(_fails_on_three, [1, 2, 3])
        on_ray = {name: run(executor) for name, run in searches.items()}
        split = {
            name: sharded_statistics(name, network, shards, executor=executor)  # type: ignore[arg-type]
            for name in whole
        }
    finally:
        ray.shutdown()
    for name, expected in serial.items():
        got = on_ray[name]
        assert (got.parameters, got.score, got.trace) == (
            expected.parameters, expected.score, expected.trace
        ), name
        for key in expected.state_dict:
            assert torch.equal(got.state_dict[key], expected.state_dict[key]), (name, key)
    for name, expected_stats in whole.items():
        assert split[name].n_examples == 24
        for key in expected_stats:
            torch.testing.assert_close(split[name][key], expected_stats[key], rtol=1e-5, atol=1e-7)


def test_ray_executor_without_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigError) as caught:
        RayExecutor().map(_square, [1])
    assert str(caught.value) == (
        "RayExecutor needs Ray, which is not installed; install it with "
        "pip install 'modelfuse[ray]', or use LocalExecutor"
    )



def test_a_dying_worker_is_one_executor_error() -> None:
    with pytest.raises(ExecutorError) as caught:
        LocalExecutor(workers=2).map(os._exit, [3, 3])  # the worker process exits at once
    message = str(caught.value)
    assert message.startswith("LocalExecutor(workers=2): a worker process died while running item 0")
    assert "use fewer workers" in message and "\n" not in message


@pytest.fixture
def stopped_workers(monkeypatch: pytest.MonkeyPatch) -> list[multiprocessing.process.BaseProcess]:
    """The workers of the pools the executor stops during the test, recorded as it stops
    them (other tests' executors may keep their own workers, and start them, until they
    are collected)."""
    import modelfuse.executors as executors

    workers: list[multiprocessing.process.BaseProcess] = []
    terminate = executors._terminate

    def recorded(pool: object) -> None:
        workers.extend((getattr(pool, "_processes", None) or {}).values())
        terminate(pool)  # type: ignore[arg-type]

    monkeypatch.setattr(executors, "_terminate", recorded)
    return workers


def test_a_failing_item_stops_the_items_still_running(
    stopped_workers: list[multiprocessing.process.BaseProcess],
) -> None:
    def waited(*_: object) -> None:  # a guard against a hang, not a timing assertion
        raise AssertionError("map waited for the items still running after one failed")

    workers = stopped_workers
    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(300)
    try:
        with pytest.raises(ValueError, match=r"item 0 \(-1\): sleep length must be non-negative"):
            LocalExecutor(workers=2).map(time.sleep, [-1, 3600, 3600])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert workers  # the pool was stopped, with the workers sleeping through the others
    assert [p.pid for p in workers if _running(p)] == []


def test_workers_that_ignore_sigterm_are_killed(
    monkeypatch: pytest.MonkeyPatch, stopped_workers: list[multiprocessing.process.BaseProcess]
) -> None:
    import modelfuse.executors as executors

    workers = stopped_workers
    monkeypatch.setattr(executors, "_TERMINATE_SECONDS", 1.0)
    # workers started now inherit an ignored SIGTERM (kept across exec): only SIGKILL stops them
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with pytest.raises(ValueError, match=r"item 0 \(-1\): sleep length must be non-negative"):
            LocalExecutor(workers=2).map(time.sleep, [-1, 3600, 3600])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert workers
    assert [p.pid for p in workers if _running(p)] == []
    assert all(p.exitcode is None or p.exitcode < 0 for p in workers)  # killed, not finished


def _running(process: multiprocessing.process.BaseProcess) -> bool:
    """Whether a worker process still runs: by its handle, and by its PID, which must
    exist and not be a zombie. ``is_alive()`` alone says alive for a child that something
    else in this test process reaped (its own wait then fails, and it cannot tell)."""
    if process.exitcode is not None:
        return False
    try:
        os.kill(process.pid, 0)  # type: ignore[arg-type]
    except ProcessLookupError:
        return False
    stat = f"/proc/{process.pid}/stat"
    if os.path.exists(stat):
        with open(stat) as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True
