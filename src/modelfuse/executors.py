"""Executors: map a function over items on local processes or a Ray cluster.

Both executors share one small interface, :meth:`map`: the function is applied
to every item, the results come back in the order of the items, an error in
one item is re-raised naming that item (its position and a short ``repr``),
and Ctrl-C cancels the work still pending before re-raising
:class:`KeyboardInterrupt`.

:class:`LocalExecutor` runs in the calling process when ``workers == 1`` and
on a :class:`concurrent.futures.ProcessPoolExecutor` otherwise.
:class:`RayExecutor` runs every item as a Ray task; Ray is imported only when
a :class:`RayExecutor` is used, so Ray stays an optional dependency.

Examples
--------
>>> from modelfuse.executors import LocalExecutor
>>> LocalExecutor(workers=1).map(abs, [-1, 2, -3])
[1, 2, 3]
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from modelfuse.errors import ConfigError

__all__ = [
    "Executor",
    "ExecutorError",
    "LocalExecutor",
    "RayExecutor",
    "resolve_executor",
]

T = TypeVar("T")
R = TypeVar("R")


class ExecutorError(RuntimeError):
    """An item failed with an exception that cannot be re-raised under its own class."""


@runtime_checkable
class Executor(Protocol):
    """What :func:`modelfuse.search` and :mod:`modelfuse.statistics` need from an executor."""

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """Return ``[function(item) for item in items]``, possibly computed in parallel."""
        ...


def _item_label(index: int, item: object) -> str:
    return f"item {index} ({repr(item)[:60]})"


def _reraise(index: int, item: object, error: BaseException) -> None:
    """Re-raise ``error`` with the failing item named, keeping its class when possible."""
    message = f"{_item_label(index, item)}: {error}"
    try:
        named = type(error)(message)
    except Exception:  # the class takes other arguments: fall back to a generic error
        named = ExecutorError(f"{message} ({type(error).__name__})")
    raise named from error


class LocalExecutor:
    """Run items in this process (``workers=1``) or on a pool of local processes.

    Parameters
    ----------
    workers : int, default 1
        Number of processes; 1 runs every item in the calling process, in order.
        With more than one worker, the function and the items must be picklable
        (a module-level function, not a lambda).

    Examples
    --------
    >>> LocalExecutor().map(len, ["a", "bb"])
    [1, 2]
    """

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def _check(self) -> int:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(
                f"workers: expected a positive integer, received {repr(self.workers)[:60]}; "
                "pass workers=1 to run in this process"
            )
        return self.workers

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """Apply ``function`` to every item; results in the order of ``items``."""
        workers = self._check()
        listed: Sequence[T] = list(items)
        if workers == 1 or len(listed) <= 1:
            results: list[R] = []
            for index, item in enumerate(listed):
                try:
                    results.append(function(item))
                except Exception as error:
                    _reraise(index, item, error)
            return results
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=min(workers, len(listed)), mp_context=multiprocessing.get_context("spawn")
        )
        futures = [pool.submit(function, item) for item in listed]
        try:
            results = []
            for index, (item, future) in enumerate(zip(listed, futures, strict=True)):
                try:
                    results.append(future.result())
                except Exception as error:
                    _reraise(index, item, error)
            return results
        except BaseException:
            for future in futures:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)


def _apply(function: Callable[[T], R], item: T) -> R:
    """Apply ``function`` to ``item``; the Ray task (callable objects cannot be Ray tasks)."""
    return function(item)


class RayExecutor:
    """Run every item as a task on a Ray cluster.

    Parameters
    ----------
    address : str or None, default None
        Address passed to ``ray.init(address=...)`` when Ray is not initialised
        yet (``"auto"`` joins a running cluster). With ``None`` an already
        initialised Ray is used, or a local one is started.
    num_cpus : float, default 1
        CPUs each task requests from Ray.
    """

    def __init__(self, address: str | None = None, num_cpus: float = 1) -> None:
        self.address = address
        self.num_cpus = num_cpus

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """Apply ``function`` to every item as Ray tasks; results in the order of ``items``."""
        try:
            import ray
        except ImportError as error:
            raise ConfigError(
                "RayExecutor needs Ray, which is not installed; install it with "
                "`pip install ray` or use LocalExecutor"
            ) from error
        if not ray.is_initialized():
            ray.init(address=self.address)
        listed = list(items)
        remote = ray.remote(num_cpus=self.num_cpus)(_apply)
        shared = ray.put(function)  # sent to the object store once, not once per item
        refs = [remote.remote(shared, item) for item in listed]
        try:
            results: list[R] = []
            for index, (item, ref) in enumerate(zip(listed, refs, strict=True)):
                try:
                    results.append(ray.get(ref))
                except ray.exceptions.RayTaskError as error:
                    cause = getattr(error, "cause", None)
                    _reraise(index, item, cause if isinstance(cause, Exception) else error)
            return results
        except BaseException:
            for ref in refs:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished or gone
                    continue
            raise


def resolve_executor(executor: Executor | None) -> Executor:
    """Return ``executor``, or a one-process :class:`LocalExecutor` when it is None."""
    if executor is None:
        return LocalExecutor(workers=1)
    if not callable(getattr(executor, "map", None)):
        raise ConfigError(
            f"executor: expected an object with a map(function, items) method such as "
            f"LocalExecutor or RayExecutor, received {type(executor).__name__}"
        )
    return executor
