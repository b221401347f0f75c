"""Executors: map a function over items on local processes or a Ray cluster.

Both executors share one small interface, :meth:`map`: the function is applied
to every item, the results come back in the order of the items, an error in
one item is re-raised naming that item (its position and a short ``repr``),
and Ctrl-C cancels the work still pending before re-raising
:class:`KeyboardInterrupt`.

:class:`LocalExecutor` runs in the calling process when ``workers == 1`` and
on a :class:`concurrent.futures.ProcessPoolExecutor` of spawned processes
otherwise. The function is pickled once, in the caller, and loaded once per
worker process; a function that cannot be sent (a lambda, a closure, a
function the workers cannot import) is refused with a
:class:`~modelfuse.errors.ConfigError` naming the fix. Consecutive calls with
the same function reuse the processes (a search's generations), until
:meth:`LocalExecutor.close`, the end of a ``with`` block, a call with another
function, or the executor's garbage collection.
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
import os
import pickle
import signal
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

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


_SEND_FIX = (
    "with worker processes, define the function at module level of an importable module "
    "(or use functools.partial of such a function), use RayExecutor, which also sends "
    "lambdas and closures, or run in this process with workers=1"
)


def _function_label(function: object) -> str:
    """A function's qualified name; another callable's ``repr`` (both shortened)."""
    name = getattr(function, "__qualname__", None)
    if isinstance(name, str):
        return f"the function {repr(name)[:60]}"
    return repr(function)[:100]


# The function of the pool this worker process belongs to, loaded once by _load_function.
_worker_function: Callable[[Any], Any] | None = None
_worker_load_error: str | None = None


class _FunctionNotLoaded(Exception):
    """The worker process could not unpickle the function (raised in the worker)."""


def _load_function(payload: bytes, threads: int) -> None:
    """Pool initializer: unpickle the function once per worker process.

    When the function brought torch in, its intra-op threads are limited to
    this worker's share of the cores, so that the workers do not oversubscribe
    the machine.
    """
    global _worker_function, _worker_load_error
    # Ctrl-C reaches the whole process group: the caller handles it and stops the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _worker_function = pickle.loads(payload)
        _worker_load_error = None
    except Exception as error:  # reported by _call_function, item by item, as one line
        _worker_function = None
        _worker_load_error = f"{type(error).__name__}: {str(error)[:200]}"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def _call_function(item: Any) -> Any:
    """Apply the worker's function to one item."""
    if _worker_function is None:
        raise _FunctionNotLoaded(_worker_load_error or "the function was not loaded")
    return _worker_function(item)


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system says), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _shutdown(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    pool.shutdown(wait=True, cancel_futures=True)


_TERMINATE_SECONDS = 10.0
"""How long a worker is given to stop after SIGTERM, then after SIGKILL."""


def _terminate(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Stop the pool at once: pending items cancelled, running ones killed (Ctrl-C, an error).

    Each worker gets SIGTERM, and SIGKILL when it is still running 10 s later
    (a worker in native code that blocks SIGTERM, say).
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + _TERMINATE_SECONDS
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=_TERMINATE_SECONDS)


class LocalExecutor:
    """Run items in this process (``workers=1``) or on a pool of local processes.

    Parameters
    ----------
    workers : int, default 1
        Number of processes; 1 runs every item in the calling process, in order.
        With more than one worker, the function and the items must be picklable
        by reference in a fresh process: a module-level function of an
        importable module (or a ``functools.partial`` of one, or an instance
        of a module-level class), not a lambda, a closure or a function
        defined in an interactive session. Anything else is refused with a
        :class:`~modelfuse.errors.ConfigError` before any work starts.

    Notes
    -----
    Worker processes are *spawned* (forking after torch has started threads
    can deadlock), so each one imports the caller's modules once, which takes
    a few seconds with torch. The function (with everything it holds, e.g. the
    models of a search) is sent once per process, not once per item, and the
    processes are kept for the next :meth:`map` with the same function object.
    Each worker gives torch its share of the cores this process may use
    (their number divided by ``workers``, at least one thread), so the
    workers do not compete for them.
    Call :meth:`close` or use the executor as a context manager to stop them
    early; they also stop when the executor is garbage-collected.

    Examples
    --------
    >>> LocalExecutor().map(len, ["a", "bb"])
    [1, 2]
    >>> import operator
    >>> with LocalExecutor(workers=2) as executor:
    ...     executor.map(operator.neg, [1, 2, 3])
    [-1, -2, -3]
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

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes, if any (the next :meth:`map` starts new ones)."""
        finalizer = getattr(self, "_finalizer", None)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._pool_function: object = None
        self._finalizer: weakref.finalize | None = None
        if finalizer is not None:
            finalizer()

    def _pool_for(
        self, function: Callable[[T], R], workers: int
    ) -> concurrent.futures.ProcessPoolExecutor:
        """The running pool for ``function``, or a new one with ``function`` loaded in it."""
        pool = getattr(self, "_pool", None)
        if pool is not None and self._pool_function is function:
            return pool
        self.close()
        try:
            payload = pickle.dumps(function, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:  # PicklingError, AttributeError, TypeError: one line
            raise ConfigError(
                f"LocalExecutor(workers={workers}): cannot send "
                f"{_function_label(function)} to worker processes "
                f"({type(error).__name__}: {str(error)[:120]}); {_SEND_FIX}"
            ) from None
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_load_function,
            initargs=(payload, max(1, _usable_cpus() // workers)),
        )
        self._pool, self._pool_function = pool, function
        self._finalizer = weakref.finalize(self, _shutdown, pool)
        return pool

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """Apply ``function`` to every item; results in the order of ``items``.

        Raises
        ------
        ConfigError
            ``workers`` is not a positive integer, or (with worker processes)
            the function cannot be pickled or the workers cannot load it.
        """
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
        pool = self._pool_for(function, workers)
        futures = [pool.submit(_call_function, item) for item in listed]
        try:
            results = []
            for index, (item, future) in enumerate(zip(listed, futures, strict=True)):
                try:
                    results.append(future.result())
                except _FunctionNotLoaded as error:
                    raise ConfigError(
                        f"LocalExecutor(workers={workers}): the worker processes cannot load "
                        f"{_function_label(function)} ({error}); {_SEND_FIX}"
                    ) from None
                except BrokenProcessPool as error:
                    raise ExecutorError(
                        f"LocalExecutor(workers={workers}): a worker process died while "
                        f"running {_item_label(index, item)} ({error}); it may have run out of "
                        "memory: use fewer workers"
                    ) from None
                except Exception as error:
                    _reraise(index, item, error)
            return results
        except BaseException:  # an item failed, or Ctrl-C: do not wait for the others
            for future in futures:
                future.cancel()
            finalizer = self._finalizer
            self._pool, self._pool_function, self._finalizer = None, None, None
            if finalizer is not None:
                finalizer.detach()
            _terminate(pool)
            raise


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
                "pip install 'modelfuse[ray]', or use LocalExecutor"
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
                except ray.exceptions.RayError as error:  # the cluster, not the function, failed
                    reason = (str(error).strip().splitlines() or [""])[0][:200]
                    raise ExecutorError(
                        f"Ray failed while running {_item_label(index, item)} "
                        f"({type(error).__name__}: {reason})"
                    ) from None
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
