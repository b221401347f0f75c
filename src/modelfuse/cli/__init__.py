"""The ``modelfuse`` command line: a thin layer over the library.

Each command lives in a module of this package named after it and registers
itself on the shared :data:`app`. Errors caused by user input
(:class:`modelfuse.errors.ModelfuseError`) end the program with one line on
standard error and exit code 2.
"""

from __future__ import annotations

import sys

import click

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


__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code instead of raising it."""
    try:
        result = app(args=argv, prog_name="modelfuse", standalone_mode=False)
    except click.ClickException as exc:  # usage errors: click's own message, exit 2
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        print("modelfuse: aborted; no output was left behind", file=sys.stderr)
        return 130
    except ModelfuseError as exc:
        print(f"modelfuse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modelfuse: interrupted; no output was left behind", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0
