"""The Typer application that every command module registers itself on."""

from __future__ import annotations

import typer

__all__ = ["app"]

app = typer.Typer(
    name="modelfuse",
    help="Fuse trained neural networks: merge weights, ensemble predictions, "
    "calibrate, and compare honestly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
