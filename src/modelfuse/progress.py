"""Progress bars with counts, for long work on the command line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["byte_speed", "progress_bar"]


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
        columns.append(_ByteSpeedColumn())
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


def byte_speed(gigabytes: float, seconds: float | None) -> str:
    """The rate of ``gigabytes`` done in ``seconds``, as the progress bar shows it.

    Examples
    --------
    >>> byte_speed(0.09, 2.0), byte_speed(3.0, 2.0), byte_speed(1.0, None)
    ('45 MB/s', '1.50 GB/s', '? MB/s')
    """
    if not seconds or seconds <= 0:
        return "? MB/s"
    rate = gigabytes / seconds
    return f"{rate:.2f} GB/s" if rate >= 1 else f"{rate * 1000:.0f} MB/s"


class _ByteSpeedColumn(ProgressColumn):
    """Bytes per second from the task's ``gb`` field (the bar itself counts items, so
    rich's transfer-speed column would show items per second as bytes)."""

    def render(self, task: Task) -> Text:
        return Text(byte_speed(task.fields.get("gb", 0.0), task.elapsed), style="progress.data.speed")
