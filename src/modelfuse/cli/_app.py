"""The Typer application that every command module registers itself on."""

from __future__ import annotations

import math
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

__all__ = ["app", "package_version"]

app = typer.Typer(
    name="modelfuse",
    help="Fuse trained neural networks: merge weights, ensemble predictions, "
    "calibrate, and compare honestly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def package_version() -> str:
    """The installed modelfuse's version."""
    try:
        return version("modelfuse")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from modelfuse import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"modelfuse {package_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Fuse trained neural networks: merge weights, ensemble predictions, calibrate,
    and compare honestly."""


def finite(value: float | None) -> float | None:
    """Option callback refusing NaN and infinity as a usage error naming the option.

    click's ``FloatRange`` lets NaN through in some click versions (every
    comparison with NaN is false), so ranges alone do not refuse it.
    """
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"expected a finite number, got {value}")
    return value
