"""Collecting every problem of a merge before any work, to report them together."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

from modelfuse.errors import ConfigError, ModelfuseError

__all__ = ["MAX_PROBLEMS", "Problems"]

MAX_PROBLEMS = 50
"""Problems listed in one error; beyond, the last line counts the others."""

T = TypeVar("T")


class Problems:
    """A list of problems (user-input errors) found while checking a merge.

    :meth:`check` runs a check and records its error instead of raising it;
    :meth:`raise_all` raises one error listing every problem: the error itself
    when there is one, else ``"N problems:"`` followed by one line per problem.
    An error already listing several problems (from the planner) adds each of
    them.

    Examples
    --------
    >>> problems = Problems()
    >>> problems.add("a: missing")
    >>> problems.check(lambda: int("x"), ValueError) is None
    True
    >>> try:
    ...     problems.raise_all()
    ... except ConfigError as exc:
    ...     print(exc)
    2 problems:
      a: missing
      invalid literal for int() with base 10: 'x'
    """

    def __init__(self) -> None:
        self.items: list[tuple[type[ModelfuseError], str]] = []

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, message: str, kind: type[ModelfuseError] = ConfigError) -> None:
        """Record one problem."""
        self.items.append((kind, message))

    def add_error(self, exc: BaseException) -> None:
        """Record an error (every problem it lists, when it lists several)."""
        kind = type(exc) if isinstance(exc, ModelfuseError) else ConfigError
        listed = getattr(exc, "problems", None)
        if isinstance(listed, list) and listed:
            self.items.extend((kind, str(p)) for p in listed)
        else:
            self.items.append((kind, str(exc)))

    def check(
        self, function: Callable[[], T], *errors: type[BaseException]
    ) -> T | None:
        """``function()``, or None after recording its ModelfuseError (or one of ``errors``)."""
        try:
            return function()
        except (ModelfuseError, *errors) as exc:
            self.add_error(exc)
            return None

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """Record a ModelfuseError raised in the block instead of propagating it."""
        try:
            yield
        except ModelfuseError as exc:
            self.add_error(exc)

    def raise_all(self) -> None:
        """Raise one error listing every problem; nothing when there is none."""
        if not self.items:
            return
        kinds = {kind for kind, _ in self.items}
        kind = kinds.pop() if len(kinds) == 1 else ConfigError
        messages = list(dict.fromkeys(message for _, message in self.items))
        count = len(messages)
        if count > MAX_PROBLEMS:
            messages = [*messages[: MAX_PROBLEMS - 1], f"and {count - MAX_PROBLEMS + 1} more"]
        if count == 1:
            error = kind(messages[0])
        else:
            error = kind(f"{count} problems:\n" + "\n".join(f"  {m}" for m in messages))
        error.problems = messages  # type: ignore[attr-defined]
        error.count = count  # type: ignore[attr-defined]
        raise error

    def raise_now(self) -> NoReturn:
        """Raise the problems found; called only where at least one was recorded."""
        self.raise_all()
        raise RuntimeError("no problem was recorded before raise_now()")
