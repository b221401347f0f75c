"""Chunks of one tensor computed on several threads, handed out in chunk order.

The methods work through a tensor chunk by chunk. When the engine gives a
piece every core (a very large tensor, merged alone), chunks whose results do
not depend on one another are computed by :func:`ordered_map` on that many
threads: torch and numpy release the GIL in their kernels, and the results
come back in chunk order, so sums over them are added in the same order as
on one thread and give the same bits. Each of those threads runs its torch
operations on one thread: with torch's own threads as well, the cores would
be oversubscribed (two chunk threads of two torch threads each on two cores
switched thousands of times per tensor).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["chunk_workers", "ordered_map"]

T = TypeVar("T")
R = TypeVar("R")


def chunk_workers() -> int:
    """Threads for the chunks of one piece: the torch threads the engine gave it."""
    return max(1, torch.get_num_threads())


def ordered_map(
    function: Callable[[T], R], items: Iterable[T], workers: int | None = None
) -> Iterator[R]:
    """``function(item)`` for every item, in order, computed up to ``workers`` at a time.

    At most ``workers + 1`` results are computed ahead of the one handed out,
    so memory stays a few chunks; ``function`` must not share buffers between
    items; ``items`` is consumed in order from the caller's thread. With one
    worker it is a plain ``map``. A consumer that stops early cancels what has
    not started.

    Examples
    --------
    >>> list(ordered_map(lambda x: x * x, [1, 2, 3, 4], workers=2))
    [1, 4, 9, 16]
    """
    workers = chunk_workers() if workers is None else max(1, workers)
    if workers <= 1:
        yield from map(function, items)
        return
    pending: collections.deque[Future[R]] = collections.deque()
    upcoming = iter(items)
    # torch's thread count is per thread, but setting it also sets the count that threads
    # started later begin with: the caller's own is set again at the end
    caller_threads = torch.get_num_threads()

    def on_one_thread(item: T) -> R:
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        return function(item)

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="modelfuse-chunks") as pool:
            try:
                for item in upcoming:
                    pending.append(pool.submit(on_one_thread, item))
                    if len(pending) > workers:
                        break
                while pending:
                    result = pending.popleft().result()
                    following = next(upcoming, _END)
                    if following is not _END:
                        pending.append(pool.submit(on_one_thread, following))  # type: ignore[arg-type]
                    yield result
            finally:
                for future in pending:
                    future.cancel()
    finally:  # once every worker has stopped
        torch.set_num_threads(caller_threads)


_END = object()
