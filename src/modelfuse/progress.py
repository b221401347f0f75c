"""Progress bars with counts, for long work on the command line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(
    description: str,
    total: int,
    *,
    total_bytes: int | None = None,
    enabled: bool = True,
    console: Console | None = None,
) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on standard error counting items (and bytes, when given).

    Yields ``advance(items, nbytes)``, safe to call from several threads.

    Examples
    --------
    >>> with progress_bar("merging", 3, enabled=False) as advance:
    ...     for _ in range(3):
    ...         advance(1, 0)
    """
    if not enabled:
        yield lambda items, nbytes: None
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
    ]
    if total_bytes is not None:
        columns.append(TextColumn("{task.fields[gb]:.2f}/{task.fields[total_gb]:.2f} GB"))
        columns.append(TransferSpeedColumn())
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    progress = Progress(*columns, console=console or Console(stderr=True), transient=False)
    done_bytes = 0
    with progress:
        task = progress.add_task(
            description, total=total, gb=0.0, total_gb=(total_bytes or 0) / 1e9
        )

        def advance(items: int, nbytes: int) -> None:
            nonlocal done_bytes
            done_bytes += nbytes
            progress.update(task, advance=items, gb=done_bytes / 1e9)

        try:
            yield advance
        except BaseException:
            progress.remove_task(task)  # an error is reported alone, not under a stale bar
            raise
