"""The ``modelfuse`` command line: a thin layer over the library.

Each command lives in a module of this package named after it and registers
itself on the shared :data:`app`. Whatever goes wrong because of the input ends
the program with one line on standard error and exit code 2: errors of the
library's own checks (:class:`modelfuse.errors.ModelfuseError`), usage errors
(click's message, naming the flag, and the command's ``--help``) and files the
system cannot read. Ctrl-C and SIGTERM end it with exit code 130 after the
command has removed its temporary files. Warnings are printed as one line each.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import typer

from modelfuse.cli._app import app
from modelfuse.errors import ModelfuseError

# Importing a command module registers its commands on ``app``.
from modelfuse.cli import merge as _merge  # noqa: E402,F401  isort: skip
from modelfuse.cli import demo as _demo  # noqa: E402,F401  isort: skip
from modelfuse.cli import diff as _diff  # noqa: E402,F401  isort: skip
from modelfuse.cli import compare as _compare  # noqa: E402,F401  isort: skip
from modelfuse.cli import statistics as _statistics  # noqa: E402,F401  isort: skip
from modelfuse.cli import ensemble as _ensemble  # noqa: E402,F401  isort: skip
from modelfuse.cli import calibrate as _calibrate  # noqa: E402,F401  isort: skip
from modelfuse.cli import extract_lora as _extract_lora  # noqa: E402,F401  isort: skip
from modelfuse.cli import moe as _moe  # noqa: E402,F401  isort: skip
from modelfuse.cli import inspect as _inspect  # noqa: E402,F401  isort: skip
from modelfuse.cli import distill as _distill  # noqa: E402,F401  isort: skip


__all__ = ["app", "main"]

INTERRUPTED = "modelfuse: interrupted; nothing was written"


def _click_class(name: str) -> type[BaseException]:
    """click's exception class ``name`` as the installed typer uses it.

    typer 0.29 and later carry their own copy of click (``typer._click``);
    earlier releases use the ``click`` package. ``typer.BadParameter`` is a
    usage error in both, so its ancestors hold the classes wherever they live.
    """
    for cls in typer.BadParameter.__mro__:
        if cls.__name__ == name:
            return cls
    raise RuntimeError(f"typer.BadParameter has no ancestor {name}; typer changed its internals")


_CLICK_EXCEPTION = _click_class("ClickException")
_USAGE_ERROR = _click_class("UsageError")


def _abort_classes() -> tuple[type[BaseException], ...]:
    """click's ``Abort`` (raised for Ctrl-C at a prompt) and typer's own."""
    module = sys.modules[_CLICK_EXCEPTION.__module__]
    found = [getattr(module, "Abort", None), getattr(typer, "Abort", None)]
    return tuple(dict.fromkeys(cls for cls in found if isinstance(cls, type)))


_ABORT = _abort_classes()


def _one_line(message: object) -> str:
    """The first non-empty line of ``message``, at most 1000 characters (a message names
    its key, what it got and the fix, with paths cut to 200 characters each: the fix comes
    last and must not be cut off)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = lines[0] if lines else type(message).__name__
    return text if len(text) <= 1000 else text[:997] + "..."


@contextmanager
def _warnings_on_one_line() -> Iterator[None]:
    """Print every warning (modelfuse's, torch's, numpy's, sklearn's) as one line, once."""
    seen: set[str] = set()

    def show(message: Any, category: Any, filename: str, lineno: int, *args: Any) -> None:
        line = _one_line(message)
        if line not in seen:
            seen.add(line)
            print(f"modelfuse: warning: {line}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
        warnings.showwarning = show
        yield


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (sent by ``timeout``, Slurm, docker) into KeyboardInterrupt.

    Commands clean their temporary files up on KeyboardInterrupt, so a
    terminated run leaves nothing behind, as an interrupted one does.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> int:
    try:
        result = app(args=argv, prog_name="modelfuse", standalone_mode=False)
    except _CLICK_EXCEPTION as exc:  # usage errors: click's message on one line, exit 2
        return _usage_error(exc, sys.argv[1:] if argv is None else argv)
    except ModelfuseError as exc:
        print(f"modelfuse: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, *_ABORT):
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except (OSError, MemoryError, RecursionError, UnicodeError) as exc:
        # The system refused a file, or an input was too large or too deeply
        # nested for a check the library does not make itself: still one line.
        print(f"modelfuse: error: {_system_error(exc)}", file=sys.stderr)
        return 2
    if result == 130:
        # typer turns KeyboardInterrupt into an exit code of 130 and returns it
        print(INTERRUPTED, file=sys.stderr)
    return result if isinstance(result, int) else 0


def _usage_error(exc: BaseException, argv: list[str]) -> int:
    """Print a usage error as ``modelfuse: error: MESSAGE (see 'modelfuse VERB --help')``.

    click's own display adds a usage line and a hint line around the message;
    every other bad input is one line, and so is this. With no arguments at all
    click's error is the help itself (no message): that is shown as it is.
    """
    message = str(exc.format_message()).strip()  # type: ignore[attr-defined]
    code = int(getattr(exc, "exit_code", 2)) or 2
    if not message:
        exc.show()  # type: ignore[attr-defined]
        return code
    # typer's suggestion of a close command name repeats click's own
    message = re.sub(r"( Did you mean [^?]*\?)\1+", r"\1", message)
    context = getattr(exc, "ctx", None)
    if context is not None:
        where = context.command_path
    elif argv and argv[0] in {command.name for command in app.registered_commands}:
        where = f"modelfuse {argv[0]}"  # an option missing its value: no context is given
    else:
        where = "modelfuse"
    hint = f" (see '{where} --help')" if isinstance(exc, _USAGE_ERROR) else ""
    print(f"modelfuse: error: {_one_line(message)}{hint}", file=sys.stderr)
    return code


def _system_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    if isinstance(exc, MemoryError):
        return "out of memory; the input is larger than this machine can hold"
    if isinstance(exc, RecursionError):
        return "an input is nested too deeply to read"
    return _one_line(exc)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code instead of raising it.

    Examples
    --------
    >>> main(["methods", "no_such_method"])  # doctest: +SKIP
    2
    """
    with _sigterm_as_interrupt(), _warnings_on_one_line():
        try:
            return _run(argv)
        except BrokenPipeError:  # the reader went away (`modelfuse methods | head`)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
        except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled
            print(INTERRUPTED, file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
