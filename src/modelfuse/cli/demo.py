"""``modelfuse demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import app

__all__ = ["demo_command"]


@app.command(
    "demo",
    help="""Run a small, real merge of generated checkpoints and report what it did.

Example:

    modelfuse demo --out ./modelfuse-demo
""",
)
def demo_command(
    out: Annotated[Path, typer.Option(help="folder for the demo's files")] = Path("modelfuse-demo"),
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    from modelfuse.demo import run_demo

    run_demo(out, seed=seed)
