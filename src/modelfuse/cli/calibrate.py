"""``modelfuse calibrate`` and ``modelfuse calibration-report``."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from modelfuse.cli._app import app, finite
from modelfuse.cli._inputs import InputsInOrder, named_files
from modelfuse.cli._output import (
    check_folder_output,
    check_output,
    publish_folder,
    refuse_output_over_inputs,
    require_parent_folder,
    staging_folder,
)
from modelfuse.cli.ensemble import (
    KIND_HELP,
    SEED_MAX,
    check_choice,
    check_kind,
    check_method,
    labels_named,
    metrics_table,
    read_labels,
    read_saved,
    write_probabilities,
    write_saved_json,
)
from modelfuse.errors import ConfigError, DataError, OutputError
from modelfuse.limits import MAX_BINS

__all__ = [
    "calibrate_command",
    "calibration_report_command",
    "conformal_table",
    "report_metrics",
]

# The methods that take each tuning option.
_REG_METHODS = ("vector", "matrix")
_BIN_METHODS = ("histogram",)


def _read_scores(path: Path | str, kind: str) -> tuple[np.ndarray, str]:
    """The scores in ``path`` (checked) and what they hold (``kind``, or the rows' answer)."""
    from modelfuse.arrays import load_array, resolve_kind
    from modelfuse.calibration.base import check_scores

    array = load_array(path)
    found = resolve_kind(array, kind, source=str(path))
    return check_scores(array, found, source=str(path)), found


def _refuse_unused(method: str, given: dict[str, tuple[object, tuple[str, ...]]]) -> None:
    for option, (value, methods) in given.items():
        if value is not None and method not in methods:
            raise ConfigError(
                f"{option}: applies to --method {' or '.join(methods)}, not {method}; drop {option}"
            )


@app.command(
    "calibrate",
    help="""Fit a post-hoc calibrator on held-out scores, or apply a saved one.

Fit (on a validation set the model was not trained on), writing CAL.json:

    modelfuse calibrate --scores val.npy --labels val_y.npy
        --method temperature -o CAL.json

Apply it to new scores, writing calibrated probabilities:

    modelfuse calibrate --apply CAL.json --scores test.npy -o test_probs.npy

Beside the in-sample metrics, fitting prints the held-out NLL and ECE of
the method by stratified K-fold cross-validation (--cv folds, seeded by
--seed), and warns when they are worse than uncalibrated.

Methods: temperature, vector, matrix (logit scaling fitted by L-BFGS on
NLL; vector and matrix with an L2 penalty --reg), platt, isotonic,
histogram (one-vs-rest with renormalisation for more than two classes;
each bin smoothed towards its midpoint by --prior-strength pseudo-samples).
--kind auto (the default) takes scores whose rows sum to 1 as probabilities
and others as logits. Files: .npy, .npz (FILE.npz:KEY), .csv.
""",
)
def calibrate_command(
    scores: Annotated[
        str,
        typer.Option(
            "--scores",
            "-s",
            "--predictions",
            "-p",
            help="NAME=FILE or FILE of (n_samples, n_classes) scores",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="CAL.json (fit) or PROBS.npy (--apply)")],
    labels: Annotated[Path | None, typer.Option("--labels", "-y", help="integer labels")] = None,
    method: Annotated[
        str, typer.Option(help="temperature, vector, matrix, platt, isotonic or histogram")
    ] = "temperature",
    kind: Annotated[str, typer.Option(help=KIND_HELP)] = "auto",
    n_bins: Annotated[
        int | None,
        typer.Option(help="histogram: number of bins (default 15)", min=1, max=MAX_BINS),
    ] = None,
    reg: Annotated[
        float | None,
        typer.Option(
            help="vector, matrix: L2 penalty strength (default 10 for vector, 100 for matrix)",
            min=0.0,
            max=1e9,
            callback=finite,
        ),
    ] = None,
    prior_strength: Annotated[
        float | None,
        typer.Option(
            help="histogram: pseudo-samples of each bin's prior (default 2)", min=1e-12, max=1e9,
            callback=finite,
        ),
    ] = None,
    cv: Annotated[
        int, typer.Option(help="folds of the held-out (cross-validated) metrics", min=2, max=100)
    ] = 5,
    seed: Annotated[
        int, typer.Option(help="seed of the cross-validation folds", min=0, max=SEED_MAX)
    ] = 0,
    apply: Annotated[Path | None, typer.Option(help="a saved CAL.json to apply")] = None,
    quiet: Annotated[
        bool, typer.Option(help="no tables; errors, warnings and 'wrote' stay")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
) -> None:
    from modelfuse.calibration.registry import CALIBRATORS, calibrator_from_json, make_calibrator

    check_kind(kind)
    ((name, scores),) = named_files([scores], option="--scores").items()
    inputs: dict[str, Path | str | None] = {
        "--scores": scores,
        "--labels": labels,
        "--apply": apply,
    }
    if apply is not None:
        refuse_output_over_inputs(out, inputs)
        check_output(out, suffix=".npy", overwrite=overwrite)
        calibrator = read_saved(apply, "calibrator", calibrator_from_json)
        s, found = _read_scores(scores, kind)
        if found != calibrator.kind:
            raise DataError(
                f"{scores}: holds {found}, but {apply} was fitted on {calibrator.kind}; give "
                f"the model's {calibrator.kind} (pass --kind {calibrator.kind} if the file "
                f"holds {calibrator.kind})"
            )
        if s.shape[1] != calibrator.n_classes_:
            raise DataError(
                f"{scores}: {s.shape[1]} classes, but {apply} was fitted on "
                f"{calibrator.n_classes_}; give the same model's scores"
            )
        probs = calibrator.predict_proba(s)
        write_probabilities(out, probs, labels, name="calibrated", quiet=quiet)
        return

    check_method(method, CALIBRATORS)
    _refuse_unused(
        method,
        {
            "--reg": (reg, _REG_METHODS),
            "--n-bins": (n_bins, _BIN_METHODS),
            "--prior-strength": (prior_strength, _BIN_METHODS),
        },
    )
    if labels is None:
        raise ConfigError("--labels: fitting a calibrator needs the labels of the scores")
    refuse_output_over_inputs(out, inputs)
    check_output(out, suffix=".json", overwrite=overwrite)
    from modelfuse.arrays import load_array
    from modelfuse.calibration.base import check_calibration_set
    from modelfuse.calibration.cross_validation import cross_validated_metrics
    from modelfuse.calibration.softmax import to_probabilities

    s, found = _read_scores(scores, kind)
    s, y = check_calibration_set(
        s, load_array(labels), found, scores_source=str(scores), labels_source=str(labels)
    )
    params: dict[str, Any] = {"kind": found}
    for param, value in (("n_bins", n_bins), ("reg", reg), ("prior_strength", prior_strength)):
        if value is not None:
            params[param] = value
    calibrator = make_calibrator(method, **params).fit(s, y)
    in_sample = calibrator.predict_proba(s)
    rows = {"uncalibrated": to_probabilities(s, found), f"{method} (in-sample)": in_sample}
    held_out = None
    try:
        held_out = cross_validated_metrics(
            make_calibrator(method, **params), s, y, cv=cv, random_state=seed
        )
    except DataError as exc:
        warnings.warn(
            f"held-out metrics not computed: {labels_named(exc, labels)}; pass a smaller --cv",
            UserWarning,
            stacklevel=1,
        )
    if held_out is not None:
        rows[f"{method} (held-out, {cv}-fold)"] = held_out.probabilities
    table, records = metrics_table(rows, y)
    if not quiet:
        typer.echo(table)
        if method == "temperature":
            typer.echo(f"temperature: {calibrator.temperature_:.4f}")
    if held_out is not None and held_out.nll > held_out.nll_uncalibrated:
        warnings.warn(
            f"{method}: the held-out NLL ({held_out.nll:.4f}, {cv}-fold) is worse than "
            f"uncalibrated ({held_out.nll_uncalibrated:.4f}); this calibrator overfits the "
            "calibration set: use fewer parameters (temperature), more regularisation, or more "
            "samples",
            UserWarning,
            stacklevel=1,
        )
    saved = calibrator.to_json()
    saved["fitted_on"] = {
        "name": name,
        "scores": str(scores),
        "labels": str(labels),
        "kind": found,
        "metrics": records,
        "cross_validation": None
        if held_out is None
        else {
            "folds": cv,
            "seed": seed,
            "nll": held_out.nll,
            "ece": held_out.ece,
            "nll_uncalibrated": held_out.nll_uncalibrated,
            "ece_uncalibrated": held_out.ece_uncalibrated,
        },
    }
    write_saved_json(out, saved)
    typer.echo(f"wrote {out}")


def report_metrics(
    probs: np.ndarray, labels: np.ndarray, *, n_bins: int, binning: str
) -> list[tuple[str, float]]:
    """The calibration report's rows: (name, value)."""
    from modelfuse.calibration.metrics import (
        brier_score,
        expected_calibration_error,
        negative_log_likelihood,
    )

    ece = expected_calibration_error
    return [
        ("accuracy", float((probs.argmax(axis=1) == labels).mean())),
        ("nll", negative_log_likelihood(probs, labels)),
        ("brier", brier_score(probs, labels)),
        (f"ece ({n_bins} {binning} bins)", ece(probs, labels, n_bins=n_bins, binning=binning)),
        ("ece_l2", ece(probs, labels, n_bins=n_bins, binning=binning, norm="l2")),
        ("mce", ece(probs, labels, n_bins=n_bins, binning=binning, norm="max")),
        ("ace (equal-mass bins)", ece(probs, labels, n_bins=n_bins, binning="quantile")),
        ("classwise_ece", ece(probs, labels, n_bins=n_bins, binning=binning, classwise=True)),
    ]


def _open_unit(value: float | None) -> float | None:
    """Option callback: a number strictly between 0 and 1 (a miscoverage level)."""
    if value is not None and not 0 < value < 1:
        raise typer.BadParameter(f"expected a number strictly between 0 and 1, got {value}")
    return value


# (row label, score, class-conditional): the three scores, and LAC with one threshold per class
_CONFORMAL_METHODS = (
    ("lac", "lac", False),
    ("aps", "aps", False),
    ("raps", "raps", False),
    ("lac-mondrian", "lac", True),
)


def conformal_table(
    probs: dict[str, np.ndarray], labels: np.ndarray, *, alpha: float, seed: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Coverage and set size of conformal sets, calibrated on a seeded random half.

    The samples are permuted with ``numpy.random.default_rng(seed)``; the
    first ``floor(n / 2)`` calibrate, the rest measure. Every input uses the
    same split. Returns the rows and the split's sizes.
    """
    import math

    from modelfuse.calibration.conformal import (
        ConformalClassifier,
        average_set_size,
        empirical_coverage,
    )

    n = labels.shape[0]
    n_cal = n // 2
    if alpha < 1 / (n_cal + 1):
        needed = math.ceil(1 / alpha - 1)
        raise ConfigError(
            f"--conformal {alpha:g}: the calibration half holds {n_cal} of the {n} samples, "
            f"and alpha = {alpha:g} needs at least 1/alpha - 1 = {needed}; "
            "pass a larger --conformal or more samples"
        )
    order = np.random.default_rng(seed).permutation(n)
    cal, test = order[:n_cal], order[n_cal:]
    rows: list[dict[str, Any]] = []
    for name, p in probs.items():
        for label, method, per_class_threshold in _CONFORMAL_METHODS:
            model = ConformalClassifier(method, alpha=alpha, class_conditional=per_class_threshold)
            model.fit(p[cal], labels[cal])
            sets = model.predict_sets(p[test])
            per_class = empirical_coverage(sets, labels[test], per_class=True)
            rows.append(
                {
                    "input": name,
                    "method": label,
                    "coverage": empirical_coverage(sets, labels[test]),
                    "mean_set_size": average_set_size(sets),
                    "worst_class_coverage": float(np.nanmin(per_class)),
                    "empty_sets": float((sets.sum(axis=1) == 0).mean()),
                }
            )
    return rows, {"n_calibration": n_cal, "n_test": n - n_cal}


_CONFORMAL_COLUMNS = ("coverage", "mean_set_size", "worst_class_coverage", "empty_sets")


def _conformal_caption(alpha: float | None, split: dict[str, int], seed: int) -> str:
    return (
        f"Conformal sets, alpha = {alpha:g} (target coverage >= {1 - alpha:g}): calibrated on "
        f"{split['n_calibration']} samples, measured on the other {split['n_test']} "
        f"(random halves, --seed {seed}); RAPS with k_reg = 1, lambda = 0.01; "
        "lac-mondrian: one LAC threshold per class"
    )


def _conformal_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    width = max(8, *(len(r["input"]) for r in rows))
    header = f"{'input':<{width}}  {'method':<6}  " + "  ".join(
        f"{c:>20}" for c in _CONFORMAL_COLUMNS
    )
    body = [
        f"{r['input']:<{width}}  {r['method']:<12}  "
        + "  ".join(f"{r[c]:>20.4f}" for c in _CONFORMAL_COLUMNS)
        for r in rows
    ]
    return [header, *body]


def _conformal_markdown(
    rows: list[dict[str, Any]], alpha: float | None, split: dict[str, int], seed: int
) -> list[str]:
    return [
        "## Conformal prediction sets",
        "",
        _conformal_caption(alpha, split, seed) + ".",
        "",
        "| input | method | " + " | ".join(_CONFORMAL_COLUMNS) + " |",
        "|---|---|" + "---:|" * len(_CONFORMAL_COLUMNS),
        *(
            f"| {r['input']} | {r['method']} | "
            + " | ".join(f"{r[c]:.4f}" for c in _CONFORMAL_COLUMNS)
            + " |"
            for r in rows
        ),
        "",
    ]


def _diagram_names(names: list[str]) -> dict[str, str]:
    """The PNG of each input: ``reliability.png`` for one, ``reliability-NAME.png`` for several."""
    if len(names) == 1:
        return {names[0]: "reliability.png"}
    files: dict[str, str] = {}
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60].strip("._") or "input"
        candidate, n = f"reliability-{stem}.png", 2
        while candidate in files.values():
            candidate, n = f"reliability-{stem}-{n}.png", n + 1
        files[name] = candidate
    return files


@app.command(
    "calibration-report",
    cls=InputsInOrder,
    help="""Calibration metrics and reliability diagrams for predicted probabilities.

Prints the metrics table (one column per input) and writes OUT/metrics.md,
OUT/metrics.json and a reliability diagram (gap bars and a confidence
histogram): OUT/reliability.png for one input, OUT/reliability-NAME.png for
each of several:

    modelfuse calibration-report --predictions p.npy --labels y.npy -o calib-report

    modelfuse calibration-report -p before=val.npy after=cal.npy -y y.npy -o calib-report

Inputs are NAME=FILE or FILE, repeated or space-separated. --kind auto (the
default) takes rows summing to 1 as probabilities and softmaxes others.
ECE uses 15 equal-width bins by default (Guo et al. 2017, torchmetrics);
--n-bins 10 matches netcal.

--risk-coverage adds AURC and E-AURC (confidence = top-label probability;
ties in confidence count as one block) to the table and writes
OUT/risk-coverage.png. --conformal ALPHA adds a table of conformal
prediction sets (LAC, APS, RAPS, and LAC with one threshold per class): the
samples are split at random into two halves (a permutation seeded by --seed;
the calibration half has floor(n/2) samples), the sets are calibrated on the
first half, and their coverage (target >= 1 - ALPHA) and mean size are
measured on the second:

    modelfuse calibration-report -p p.npy -y y.npy -o r --risk-coverage --conformal 0.1
""",
)
def calibration_report_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="the report folder to create")],
    labels: Annotated[Path, typer.Option("--labels", "-y", help="integer labels")],
    predictions: Annotated[
        list[str] | None,
        typer.Option(
            "--predictions",
            "-p",
            "--probabilities",
            help="NAME=FILE or FILE of (n_samples, n_classes) predictions; more may follow",
        ),
    ] = None,
    more: Annotated[
        list[str] | None, typer.Argument(help="further predictions files", show_default=False)
    ] = None,
    kind: Annotated[str, typer.Option(help=KIND_HELP)] = "auto",
    n_bins: Annotated[int, typer.Option(help="number of bins", min=1, max=MAX_BINS)] = 15,
    binning: Annotated[str, typer.Option(help="uniform or quantile")] = "uniform",
    risk_coverage: Annotated[
        bool,
        typer.Option(
            "--risk-coverage",
            help="add AURC and E-AURC to the table and write risk-coverage.png",
        ),
    ] = False,
    conformal: Annotated[
        float | None,
        typer.Option(
            metavar="ALPHA",
            help="miscoverage in (0, 1), e.g. 0.1: add a coverage and set-size table of "
            "conformal sets calibrated on a seeded random half of the samples",
            callback=_open_unit,  # an open range, which click's FloatRange cannot show
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="seed of the --conformal calibration split", min=0, max=SEED_MAX)
    ] = 0,
    quiet: Annotated[
        bool, typer.Option(help="no table; errors, warnings and 'wrote' stay")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
) -> None:
    check_kind(kind)
    check_choice(binning, ("uniform", "quantile"), "--binning")
    named = named_files([*(predictions or []), *(more or [])], option="--predictions")
    if not named:
        raise ConfigError("--predictions: give at least one file, e.g. --predictions p.npy")
    inputs: dict[str, Path | str | None] = {f"--predictions {n}": p for n, p in named.items()}
    inputs["--labels"] = labels
    refuse_output_over_inputs(out, inputs)
    check_folder_output(out, overwrite=overwrite)
    require_parent_folder(out)
    from modelfuse.calibration.reliability import reliability_diagram
    from modelfuse.calibration.softmax import to_probabilities

    probs: dict[str, np.ndarray] = {}
    for name, path in named.items():
        s, found = _read_scores(path, kind)
        probs[name] = to_probabilities(s, found)
        first = next(iter(probs.values()))
        if probs[name].shape != first.shape:
            raise DataError(
                f"{path}: shape {probs[name].shape} differs from {named[next(iter(named))]}'s "
                f"{first.shape}; every file must hold the same samples and classes"
            )
    shape = next(iter(probs.values())).shape
    y = read_labels(labels, shape[0], shape[1])
    metrics = {
        name: dict(report_metrics(p, y, n_bins=n_bins, binning=binning))
        for name, p in probs.items()
    }
    curves = {}
    if risk_coverage:
        from modelfuse.evaluation.selective import risk_coverage_curve

        for name, p in probs.items():
            curves[name] = risk_coverage_curve(p.max(axis=1), p.argmax(axis=1) == y)
            metrics[name]["aurc"] = curves[name].aurc
            metrics[name]["e_aurc"] = curves[name].e_aurc
    conformal_rows: list[dict[str, Any]] = []
    split: dict[str, int] = {}
    if conformal is not None:
        conformal_rows, split = conformal_table(probs, y, alpha=conformal, seed=seed)
    rows = list(next(iter(metrics.values())))
    names = list(metrics)
    width = max(len(r) for r in rows)
    columns = [max(8, len(n)) for n in names]
    header = f"{'metric':<{width}}  " + "  ".join(f"{n:>{c}}" for n, c in zip(names, columns))
    lines = [header]
    for row in rows:
        values = "  ".join(f"{metrics[n][row]:>{c}.4f}" for n, c in zip(names, columns))
        lines.append(f"{row:<{width}}  {values}")
    conformal_lines = _conformal_lines(conformal_rows)
    if not quiet:
        typer.echo("\n".join(lines))
        if conformal_rows:
            typer.echo("")
            typer.echo(_conformal_caption(conformal, split, seed))
            typer.echo("\n".join(conformal_lines))

    diagrams = _diagram_names(names)
    pictures = list(diagrams.values()) + (["risk-coverage.png"] if curves else [])
    markdown = [
        "# Calibration report",
        "",
        f"{shape[0]} samples, {shape[1]} classes; labels {labels}.",
        "",
        *(f"- {name}: {path}" for name, path in named.items()),
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        *(
            f"| {row} | " + " | ".join(f"{metrics[n][row]:.4f}" for n in names) + " |"
            for row in rows
        ),
        "",
        *(
            [
                "AURC and E-AURC: the risk-coverage curve with the top-label probability as "
                "confidence (ties in confidence as one block; Geifman et al. 2019).",
                "",
            ]
            if curves
            else []
        ),
        *(_conformal_markdown(conformal_rows, conformal, split, seed) if conformal_rows else []),
        *(f"![reliability diagram: {name}]({diagrams[name]})" for name in names),
        *(["", "![risk-coverage curves](risk-coverage.png)"] if curves else []),
        "",
    ]
    summary: dict[str, Any] = {
        "predictions": dict(named),
        "labels": str(labels),
        "n_bins": n_bins,
        "binning": binning,
        "metrics": metrics,
    }
    if conformal_rows:
        summary["conformal"] = {
            "alpha": conformal,
            "seed": seed,
            "split": "random halves; calibration = the first floor(n/2) of a seeded permutation",
            **split,
            "rows": conformal_rows,
        }
    try:
        summary_text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise DataError(f"{out}: a metric is NaN or infinite; nothing was written") from None
    staging = staging_folder(out)
    try:
        (staging / "metrics.md").write_text("\n".join(markdown))
        (staging / "metrics.json").write_text(summary_text)
        for name, p in probs.items():
            reliability_diagram(
                p,
                y,
                staging / diagrams[name],
                n_bins=n_bins,
                binning=binning,
                title=f"Reliability: {name[:60]}",
            )
        if curves:
            from modelfuse.evaluation.selective import risk_coverage_plot

            risk_coverage_plot(curves, staging / "risk-coverage.png")
        publish_folder(staging, out)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the report ({exc.strerror or exc})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    typer.echo(f"wrote {out}/metrics.md, metrics.json, {', '.join(pictures)}")
