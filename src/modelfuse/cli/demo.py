"""``modelfuse demo``: the end-to-end fusion study on scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import app
from modelfuse.errors import ConfigError

__all__ = ["demo_command"]


def _parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` as ``(0, 1, 2)``; anything else is refused naming ``--seeds``."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 100 or not all(p.isdigit() and len(p) <= 10 for p in parts):
        raise ConfigError(
            f"--seeds: expected non-negative integers separated by commas (e.g. 0,1,2), got "
            f"{text[:60]!r}"
        )
    return tuple(int(p) for p in parts)


@app.command(
    "demo",
    help="""Train a small model zoo on scikit-learn's digits, fuse it with every method
(soups, Fisher, RegMean, task arithmetic, TIES, DARE, Model Stock, WiSE-FT, ensembles,
temperature scaling, DaWin, AdaMerging, gradient matching), compare on a held-out test
split and on a shifted one (the test digits tilted), run a federated scenario (digits over
10 non-IID clients; FedAvg, FedAvgM, FedAU, TIES and Fisher in Flower's simulation engine;
local, global or between per client) and write report.md and report.html.

The full run takes well under five minutes on two cores, --quick under one.
--seeds 0,1,2 repeats the soup scenario on each seed and reports each method's mean and
spread across seeds (each extra seed adds about a quarter of a run).
An earlier demo output in OUT is replaced; any other existing OUT is refused.

Example:

    modelfuse demo --out ./modelfuse-demo --quick --seeds 0,1,2
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
        int | None,
        typer.Option(
            help="seed of the splits, training and bootstrap (default: 0)", min=0, max=2**32 - 1
        ),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="several seeds, comma-separated (e.g. 0,1,2): the full study on the first, the "
            "soup scenario on each, and each method's mean and spread across seeds"
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress and no summary table")] = False,
    scenario: Annotated[
        str,
        typer.Option(help="digits, or text: MiniLM fine-tuned on three text tasks and merged "
                     "(needs pip install 'modelfuse[text]'; under 10 minutes, --quick under 2)"),
    ] = "digits",
) -> None:
    from modelfuse.demo import run_demo

    if scenario != "digits":
        _text_scenario(scenario, out, quick=quick, seed=seed, seeds=seeds, quiet=quiet)
        return
    from modelfuse.demo.run import check_seeds

    if seeds is not None and seed is not None:
        raise ConfigError("--seed and --seeds: give one of them (--seeds 0,1,2 runs every seed)")
    chosen = (0 if seed is None else seed,) if seeds is None else _parse_seeds(seeds)
    chosen = check_seeds(chosen, flag="--seeds")
    result = run_demo(out, quick=quick, seeds=chosen, progress=not quiet)
    if quiet:
        typer.echo(f"wrote {result.report}")


def _text_scenario(
    scenario: str, out: Path, *, quick: bool, seed: int | None, seeds: str | None, quiet: bool
) -> None:
    """``--scenario text``: :func:`modelfuse.demo.text.run_text_demo`."""
    if scenario != "text":
        raise ConfigError(f"--scenario: unknown scenario {scenario[:40]!r}; valid: digits, text")
    if seeds is not None:
        raise ConfigError("--seeds: only the digits scenario repeats seeds; pass --seed N")
    from modelfuse.demo.text import run_text_demo

    result = run_text_demo(out, quick=quick, seed=seed or 0, progress=not quiet)
    if quiet:
        typer.echo(f"wrote {result.report}")
