"""``modelfuse demo``: the end-to-end fusion study on scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import app

__all__ = ["demo_command"]


@app.command(
    "demo",
    help="""Train a small model zoo on scikit-learn's digits, fuse it with every method
(soups, Fisher, RegMean, task arithmetic, TIES, DARE, Model Stock, WiSE-FT, ensembles,
temperature scaling), compare on a held-out test split, run a federated scenario (digits
over 10 non-IID clients; FedAvg, FedAvgM, FedAU, TIES and Fisher in Flower's simulation
engine; local, global or between per client) and write report.md and report.html.

The full run takes well under five minutes on two cores, --quick under one.
An earlier demo output in OUT is replaced; any other existing OUT is refused.

Example:

    modelfuse demo --out ./modelfuse-demo --quick --seed 0
""",
)
def demo_command(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="output folder of the report and models")
    ] = Path("modelfuse-demo"),
    quick: Annotated[
        bool, typer.Option("--quick", help="fewer models, epochs and bootstrap resamples")
    ] = False,
    seed: Annotated[
        int, typer.Option(help="seed of the splits, training and bootstrap", min=0, max=2**32 - 1)
    ] = 0,
    quiet: Annotated[bool, typer.Option(help="no progress and no summary table")] = False,
) -> None:
    from modelfuse.demo import run_demo

    result = run_demo(out, quick=quick, seed=seed, progress=not quiet)
    if quiet:
        typer.echo(f"wrote {result.report}")
