"""``modelfuse compare``: candidates' predictions against a reference, with intervals and tests."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from modelfuse.cli._app import app
from modelfuse.cli._output import check_folder_output, publish_folder, staging_folder
from modelfuse.cli.ensemble import check_kind
from modelfuse.errors import ConfigError, DataError, OutputError

__all__ = ["compare_command", "parse_named_files"]


def parse_named_files(items: list[str], *, option: str = "--predictions") -> dict[str, str]:
    """Parse ``name=FILE`` arguments into an ordered mapping; reject duplicates and bad items."""
    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(
                f"{option} {item!r}: expected NAME=FILE, e.g. {option} fused=fused_probs.npy"
            )
        if name in named:
            raise ConfigError(
                f"{option}: the name {name!r} is given twice ({named[name]} and {path}); "
                "give every candidate its own name"
            )
        named[name] = path
    return named


@app.command(
    "compare",
    help="""Compare models' predictions on the same labelled samples, honestly.

Prints, for each candidate, the metric with its bootstrap confidence interval,
the difference to the reference with its paired interval, and the
Holm-adjusted p-value of a paired test against the reference; writes
OUT/report.md (and report.html) with forest plots and, for three or more
candidates, a critical-difference diagram.

Example:

    modelfuse compare --predictions base=base.npy --predictions soup=soup.npy
        --predictions ties=ties.npy --labels y.npy --reference base
        --metric accuracy -o compare-report
""",
)
def compare_command(
    predictions: Annotated[
        list[str],
        typer.Option(
            "--predictions",
            "-p",
            help="NAME=FILE of one candidate's (n_samples, n_classes) predictions "
            "(.npy, .npz, .npz:KEY, .csv); repeat for each candidate",
        ),
    ],
    labels: Annotated[Path, typer.Option("--labels", "-y", help="integer labels (n_samples,)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the report folder to create")],
    reference: Annotated[
        str | None, typer.Option(help="the candidate the others are compared with [default: first]")
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            help="accuracy, balanced_accuracy, macro_f1, auroc, nll, brier or ece"
        ),
    ] = "accuracy",
    kind: Annotated[
        str, typer.Option(help="what the files hold: probabilities or logits")
    ] = "probabilities",
    test: Annotated[
        str, typer.Option(help="paired test against the reference: permutation, bootstrap, mcnemar")
    ] = "permutation",
    interval: Annotated[str, typer.Option(help="bootstrap interval: bca or percentile")] = "bca",
    confidence: Annotated[float, typer.Option(help="confidence level of the intervals")] = 0.95,
    n_resamples: Annotated[
        int, typer.Option(help="bootstrap resamples (and permutations)", min=2)
    ] = 2000,
    blocks: Annotated[
        int, typer.Option(help="disjoint blocks of samples ranked for the Friedman test", min=2)
    ] = 10,
    stratify: Annotated[bool, typer.Option(help="resample within each class")] = False,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
) -> None:
    from modelfuse.arrays import load_array
    from modelfuse.evaluation.comparison import compare_predictions
    from modelfuse.report.comparison import write_comparison_report
    from modelfuse.report.table import comparison_table

    check_kind(kind)
    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence: expected a level in (0, 1) such as 0.95, got {confidence}")
    check_folder_output(out, overwrite=overwrite)
    files = parse_named_files(predictions)
    arrays = {name: load_array(path) for name, path in files.items()}
    y = load_array(labels)
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise DataError(
            f"--predictions: the candidates' shapes differ ({listed}); every file must hold "
            "the same samples and classes"
        )
    comparison = compare_predictions(
        arrays,
        y,
        reference=reference,
        metric=metric,
        kind=kind,  # type: ignore[arg-type]
        confidence_level=confidence,
        n_resamples=n_resamples,
        interval=interval,  # type: ignore[arg-type]
        test=test,  # type: ignore[arg-type]
        stratify=stratify,
        n_blocks=blocks,
        random_state=seed,
    )
    command = "modelfuse " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else ""
    try:
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        staging = staging_folder(out)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the report folder ({exc})") from None
    try:
        write_comparison_report(comparison, staging, command=command)
        publish_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    typer.echo(comparison_table(comparison, style="text"))
    if comparison.friedman is not None:
        typer.echo(str(comparison.friedman))
    typer.echo(f"wrote {out / 'report.md'} and {out / 'report.html'}")
