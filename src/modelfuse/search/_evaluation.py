"""Evaluating a batch of candidates in this process or through an executor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from modelfuse.executors import Executor, resolve_executor

__all__ = ["describe", "evaluate_all"]

T = TypeVar("T")


def describe(score: object) -> str:
    """A short name for a score in messages: its qualified name, or its ``repr``.

    Examples
    --------
    >>> describe(abs), describe(lambda sd: 0.0)
    ("'abs'", "'<lambda>'")
    """
    name = getattr(score, "__qualname__", None)
    return repr(name)[:60] if isinstance(name, str) else repr(score)[:60]


def evaluate_all(
    executor: Executor | None, function: Callable[[T], float], items: Sequence[T]
) -> list[float]:
    """``[float(function(item)) for item in items]``, through ``executor`` when one is given.

    Without an executor the items are evaluated one by one in this process and
    an error propagates unchanged; with one, the executor decides where they
    run (and names a failing item in its error).

    Examples
    --------
    >>> evaluate_all(None, abs, [-1, 2])
    [1.0, 2.0]
    """
    if executor is None:
        return [float(function(item)) for item in items]
    return [float(value) for value in resolve_executor(executor).map(function, list(items))]
