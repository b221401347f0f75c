"""``modelfuse compare``: candidates' predictions against a reference, with intervals and tests."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from modelfuse.arrays import KIND_OPTIONS
from modelfuse.cli._app import app
from modelfuse.cli._inputs import InputsInOrder, named_files
from modelfuse.cli._output import (
    check_folder_output,
    publish_folder,
    refuse_output_over_inputs,
    staging_folder,
)
from modelfuse.cli.ensemble import check_choice
from modelfuse.errors import ConfigError, DataError, OutputError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["compare_command"]

METRIC_NAMES = "accuracy, balanced_accuracy, macro_f1, auroc, nll, brier or ece"
TESTS = ("bootstrap", "permutation", "mcnemar")
INTERVALS = ("bca", "percentile")


def _level(value: float) -> float:
    if not 0 < value < 1:
        raise typer.BadParameter(f"expected a level in (0, 1) such as 0.95, got {value:g}")
    return value


_KEYWORDS_AS_FLAGS = {
    "pass stratify=True (CLI: --stratify)": "pass --stratify",
    "stratify=True": "--stratify",
    "use test='bootstrap' or metric='accuracy'": "pass --test bootstrap or --metric accuracy",
}


def _flags(message: str) -> str:
    """A library message with its Python keywords re-worded as this command's flags."""
    for keyword, flag in _KEYWORDS_AS_FLAGS.items():
        message = message.replace(keyword, flag)
    return re.sub(r"pass n_permutations >= (\d+)", r"pass --n-permutations \1 (or more)", message)


def _no_friedman(n_samples: int, blocks: int) -> str:
    if n_samples < 2 * blocks:
        return (
            f"--blocks {blocks}: no Friedman test, as {n_samples} samples give fewer than 2 per "
            f"block; pass --blocks {max(2, n_samples // 2)} or fewer to rank the candidates"
        )
    return (
        f"--blocks {blocks}: no Friedman test, as the metric is undefined on some block "
        "(a class missing from it); pass fewer --blocks to rank the candidates"
    )


def _load_groups(path: Path, n_samples: int) -> np.ndarray:
    """The --groups file: one id per sample, at least two distinct ids."""
    import numpy as np

    from modelfuse.arrays import load_array

    ids = np.asarray(load_array(path))
    if ids.ndim == 2 and ids.shape[1] == 1:
        ids = ids[:, 0]
    if ids.ndim != 1 or ids.shape[0] != n_samples:
        raise DataError(
            f"{path}: expected one group id per sample, shape ({n_samples},), got {ids.shape}; "
            "pass a file with one id per labelled sample to --groups"
        )
    if ids.dtype.kind == "f" and not np.isfinite(ids).all():
        raise DataError(f"{path}: a group id is NaN or infinite; expected one finite id per sample")
    if len(np.unique(ids)) < 2:
        raise DataError(
            f"{path}: all {n_samples} samples are in one group; --groups needs at least 2 "
            "groups (or leave --groups out to resample samples)"
        )
    return ids


@app.command(
    "compare",
    cls=InputsInOrder,
    help="""Compare models' predictions on the same labelled samples, honestly.

Prints, for each distinct model (candidates with identical predictions share
one row), the metric with its bootstrap confidence interval, the difference to
the reference with its interval, and the Holm-adjusted p-value and verdict of
a paired test against the reference, then notes (the leader, picked on these
samples, and whether its edge is significant; the smallest achievable p-value
when it matters); writes OUT/ with report.md, a self-contained report.html,
results.json (every number), forest plots and, for three or more models, a
critical-difference diagram. With the default --test bootstrap, the p-value
and the Holm-consistent interval come from the same resampled differences and
never disagree.

Candidates are NAME=FILE or FILE (named after the file), repeated (-p a.npy
-p b.npy) or listed after one flag (-p a.npy b.npy), and keep the order given;
the reference is the first unless --reference names another. Example:

    modelfuse compare --predictions base=base.npy soup=soup.npy ties.npy
        --labels y.npy --reference base --metric accuracy -o compare-report
""",
)
def compare_command(
    *,
    predictions: Annotated[
        list[str] | None,
        typer.Option(
            "--predictions",
            "-p",
            help="NAME=FILE or FILE (named after the file) of one candidate's (n_samples, "
            "n_classes) predictions (.npy, .npz, .npz:KEY, .csv); repeat the flag or list "
            "several files after it",
            show_default=False,
        ),
    ] = None,
    more: Annotated[
        list[str] | None,
        typer.Argument(help="further NAME=FILE or FILE candidates", show_default=False),
    ] = None,
    labels: Annotated[
        Path, typer.Option("--labels", "-y", help="integer labels (n_samples,)")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="the report folder to create")],
    reference: Annotated[
        str | None, typer.Option(help="the candidate the others are compared with (default: first)")
    ] = None,
    metric: Annotated[str, typer.Option(help=METRIC_NAMES)] = "accuracy",
    kind: Annotated[
        str,
        typer.Option(
            help="what the files hold: auto (rows that are probability distributions are "
            "probabilities, anything else logits), probabilities or logits"
        ),
    ] = "auto",
    test: Annotated[
        str,
        typer.Option(help="paired test against the reference: bootstrap, permutation, mcnemar"),
    ] = "bootstrap",
    interval: Annotated[str, typer.Option(help="bootstrap interval: bca or percentile")] = "bca",
    confidence: Annotated[
        float,
        typer.Option(help="confidence level of the intervals, in (0, 1)", callback=_level),
    ] = 0.95,
    n_resamples: Annotated[
        int,
        typer.Option(help="bootstrap resamples (and permutations)", min=100, max=1_000_000),
    ] = 2000,
    n_permutations: Annotated[
        int | None,
        typer.Option(
            help="resamples (or permutations) behind each test's p-value (default: enough "
            "that the smallest Holm-adjusted p is 0.005, at least --n-resamples)",
            min=100,
            max=1_000_000,
            show_default=False,
        ),
    ] = None,
    groups: Annotated[
        Path | None,
        typer.Option(
            "--groups",
            "-g",
            help="one group id per sample (.npy, .csv): samples of one group (views of one "
            "image) are resampled and permuted together",
            show_default=False,
        ),
    ] = None,
    blocks: Annotated[
        int,
        typer.Option(
            help="disjoint blocks of samples ranked for the Friedman test (3+ candidates)",
            min=2,
            max=10_000,
        ),
    ] = 10,
    stratify: Annotated[bool, typer.Option(help="resample within each class")] = False,
    seed: Annotated[
        int, typer.Option(help="seed of the resamples, permutations and blocks", min=0)
    ] = 0,
    quiet: Annotated[
        bool, typer.Option("--quiet", help="print no table, only the final line")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace OUT if it exists")
    ] = False,
) -> None:
    from modelfuse.arrays import check_labels, load_array, resolve_kind
    from modelfuse.evaluation.comparison import compare_predictions
    from modelfuse.evaluation.metrics import METRICS, prepare_predictions
    from modelfuse.report.comparison import write_comparison_report
    from modelfuse.report.table import comparison_table, friedman_summary

    items = [*(predictions or []), *(more or [])]
    if not items:
        raise ConfigError(
            "--predictions: give each candidate's file, e.g. -p base=base.npy soup=soup.npy"
        )
    check_choice(kind, KIND_OPTIONS, "--kind")
    check_choice(metric, METRICS, "--metric")
    check_choice(test, TESTS, "--test")
    check_choice(interval, INTERVALS, "--interval")
    if test == "mcnemar" and metric != "accuracy":
        raise ConfigError(
            f"--test mcnemar compares accuracies, but --metric is {metric}; "
            "pass --test bootstrap or --metric accuracy"
        )
    if groups is not None and test == "mcnemar":
        raise ConfigError(
            "--test mcnemar treats samples as independent, but --groups was given; "
            "pass --test bootstrap or --test permutation"
        )
    if groups is not None and stratify:
        raise ConfigError(
            "--stratify resamples within classes and --groups resamples whole groups; "
            "pass one of them"
        )
    files = named_files(items, option="--predictions")
    if reference is not None and reference not in files:
        raise ConfigError(
            f"--reference: {reference[:60]!r} is not a candidate; expected one of "
            f"{', '.join(n[:40] for n in files)}"
        )
    check_folder_output(out, overwrite=overwrite)
    inputs = {**{f"--predictions {name}": path for name, path in files.items()}, "--labels": labels}
    if groups is not None:
        inputs["--groups"] = groups
    refuse_output_over_inputs(out, inputs)
    arrays = {name: load_array(path) for name, path in files.items()}
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n[:40]} {s}" for n, s in shapes.items())
        raise DataError(
            f"--predictions: the candidates' shapes differ ({listed}); every file must hold "
            "the same samples and classes"
        )
    first = next(iter(arrays.values()))
    if first.ndim != 2:
        raise DataError(
            f"{next(iter(files.values()))}: expected shape (n_samples, n_classes), "
            f"got {first.shape}"
        )
    y = check_labels(
        load_array(labels), n_samples=first.shape[0], n_classes=first.shape[1], source=str(labels)
    )
    probabilities = {}
    for name, array in arrays.items():
        source = files[name]
        held = resolve_kind(array, kind, source=source)
        probabilities[name], _ = prepare_predictions(array, y, kind=held, source=source)
    if y.shape[0] < 2:
        raise DataError(f"{labels}: {y.shape[0]} sample; comparing needs at least 2 labelled samples")
    group_ids = None if groups is None else _load_groups(groups, y.shape[0])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            comparison = compare_predictions(
            probabilities,
            y,
            reference=reference,
            metric=metric,
            kind="probabilities",
            confidence_level=confidence,
            n_resamples=n_resamples,
            interval=interval,  # type: ignore[arg-type]
            test=test,  # type: ignore[arg-type]
            stratify=stratify,
            n_blocks=blocks,
            random_state=seed,
            groups=group_ids,
            n_permutations=n_permutations,
        )
    except (ConfigError, DataError) as exc:
        raise type(exc)(_flags(str(exc))) from None
    warned = set()
    for caught_warning in caught:
        text = _flags(str(caught_warning.message))
        warned.add(str(caught_warning.message))
        warnings.warn(text, caught_warning.category, stacklevel=1)
    if len(files) >= 3 and comparison.friedman is None:
        warnings.warn(_no_friedman(len(y), blocks), UserWarning, stacklevel=1)
    command = "modelfuse " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else ""
    try:
        out.resolve().parent.mkdir(parents=True, exist_ok=True)
        staging = staging_folder(out)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the report folder ({exc})") from None
    try:
        written = write_comparison_report(comparison, staging, command=command, files=files)
        publish_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not quiet:
        typer.echo(comparison_table(comparison, style="text"))
        if comparison.friedman is not None:
            typer.echo(friedman_summary(comparison.friedman))
        for note in comparison.notes:
            if note not in warned:  # a warning already went to stderr
                typer.echo(f"note: {_flags(note)}")
    typer.echo(f"wrote {out}/ ({', '.join(sorted(p.name for p in written))})")
