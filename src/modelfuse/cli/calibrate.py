"""``modelfuse calibrate`` and ``modelfuse calibration-report``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from modelfuse.cli._app import app
from modelfuse.cli._output import (
    check_folder_output,
    check_output,
    publish_folder,
    require_parent_folder,
    staging_folder,
    write_json,
)
from modelfuse.cli.ensemble import (
    check_kind,
    check_method,
    metrics_table,
    read_labels,
    read_saved,
    write_probabilities,
)
from modelfuse.errors import ConfigError, DataError, OutputError

__all__ = ["calibrate_command", "calibration_report_command", "report_metrics"]


def _read_scores(path: Path, kind: str) -> np.ndarray:
    from modelfuse.arrays import load_array
    from modelfuse.calibration.base import check_scores

    return check_scores(load_array(path), kind, source=str(path))


@app.command(
    "calibrate",
    help="""Fit a post-hoc calibrator on held-out scores, or apply a saved one.

Fit (on a validation set the model was not trained on), writing CAL.json:

    modelfuse calibrate --scores val.npy --labels val_y.npy
        --method temperature -o CAL.json

Apply it to new scores, writing calibrated probabilities:

    modelfuse calibrate --apply CAL.json --scores test.npy -o test_probs.npy

Methods: temperature, vector, matrix (logit scaling fitted by L-BFGS on
NLL), platt, isotonic, histogram (one-vs-rest with renormalisation for
more than two classes). --kind says whether the scores are logits (the
default) or probabilities. Files: .npy, .npz (FILE.npz:KEY), .csv.
""",
)
def calibrate_command(
    scores: Annotated[Path, typer.Option("--scores", "-s", help="(n_samples, n_classes) scores")],
    out: Annotated[Path, typer.Option("--out", "-o", help="CAL.json (fit) or PROBS.npy (--apply)")],
    labels: Annotated[Path | None, typer.Option("--labels", "-y", help="integer labels")] = None,
    method: Annotated[
        str, typer.Option(help="temperature, vector, matrix, platt, isotonic or histogram")
    ] = "temperature",
    kind: Annotated[
        str | None, typer.Option(help="what the scores are: logits or probabilities [fit: logits]")
    ] = None,
    n_bins: Annotated[int, typer.Option(help="histogram: number of bins")] = 15,
    apply: Annotated[Path | None, typer.Option(help="a saved CAL.json to apply")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
) -> None:
    from modelfuse.calibration.registry import CALIBRATORS, calibrator_from_json, make_calibrator

    if apply is not None:
        check_output(out, suffix=".npy", overwrite=overwrite)
        calibrator = read_saved(apply, "calibrator", calibrator_from_json)
        if kind is not None and check_kind(kind) != calibrator.kind:
            raise ConfigError(
                f"--kind {kind}: {apply} was fitted on {calibrator.kind}; give the same kind"
            )
        s = _read_scores(scores, calibrator.kind)
        if s.shape[1] != calibrator.n_classes_:
            raise DataError(
                f"{scores}: {s.shape[1]} classes, but {apply} was fitted on "
                f"{calibrator.n_classes_}; give the same model's scores"
            )
        write_probabilities(out, calibrator.predict_proba(s), labels, name="calibrated")
        return

    kind = check_kind(kind or "logits")
    check_method(method, CALIBRATORS)
    if labels is None:
        raise ConfigError("--labels: fitting a calibrator needs the labels of the scores")
    check_output(out, suffix=".json", overwrite=overwrite)
    from modelfuse.arrays import load_array
    from modelfuse.calibration.base import check_calibration_set
    from modelfuse.calibration.softmax import to_probabilities

    s = _read_scores(scores, kind)
    s, y = check_calibration_set(
        s, load_array(labels), kind, scores_source=str(scores), labels_source=str(labels)
    )
    params: dict[str, Any] = {"kind": kind}
    if method == "histogram":
        params["n_bins"] = n_bins
    calibrator = make_calibrator(method, **params).fit(s, y)
    before = to_probabilities(s, kind)
    table, records = metrics_table(
        {"uncalibrated": before, f"{method} (in-sample)": calibrator.predict_proba(s)}, y
    )
    typer.echo(table)
    if hasattr(calibrator, "temperature_"):
        typer.echo(f"temperature: {calibrator.temperature_:.4f}")
    saved = calibrator.to_json()
    saved["fitted_on"] = {"scores": str(scores), "labels": str(labels), "metrics": records}
    write_json(out, saved)
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


@app.command(
    "calibration-report",
    help="""Calibration metrics and a reliability diagram for predicted probabilities.

Prints the metrics table and writes OUT/metrics.md, OUT/metrics.json and
OUT/reliability.png (gap bars and a confidence histogram):

    modelfuse calibration-report --probabilities p.npy --labels y.npy -o calib-report

ECE uses 15 equal-width bins by default (Guo et al. 2017, torchmetrics);
--n-bins 10 matches netcal.
""",
)
def calibration_report_command(
    probabilities: Annotated[
        Path, typer.Option("--probabilities", "-p", help="(n_samples, n_classes) predictions")
    ],
    labels: Annotated[Path, typer.Option("--labels", "-y", help="integer labels")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the report folder to create")],
    kind: Annotated[
        str, typer.Option(help="what the file holds: probabilities or logits")
    ] = "probabilities",
    n_bins: Annotated[int, typer.Option(help="number of bins")] = 15,
    binning: Annotated[str, typer.Option(help="uniform or quantile")] = "uniform",
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
) -> None:
    check_kind(kind)
    if binning not in ("uniform", "quantile"):
        raise ConfigError(f"--binning: expected uniform or quantile, got {binning!r}")
    if n_bins < 1:
        raise ConfigError(f"--n-bins: expected a positive integer, got {n_bins}")
    check_folder_output(out, overwrite=overwrite)
    require_parent_folder(out)
    from modelfuse.calibration.reliability import reliability_diagram
    from modelfuse.calibration.softmax import to_probabilities

    probs = to_probabilities(_read_scores(probabilities, kind), kind)
    y = read_labels(labels, probs.shape[0], probs.shape[1])
    rows = report_metrics(probs, y, n_bins=n_bins, binning=binning)
    width = max(len(name) for name, _ in rows)
    table = "\n".join(f"{name:<{width}}  {value:.4f}" for name, value in rows)
    typer.echo(table)

    markdown = [
        f"# Calibration report: {probabilities}",
        "",
        f"{probs.shape[0]} samples, {probs.shape[1]} classes; labels {labels}.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {name} | {value:.4f} |" for name, value in rows),
        "",
        "![reliability diagram](reliability.png)",
        "",
    ]
    staging = staging_folder(out)
    try:
        (staging / "metrics.md").write_text("\n".join(markdown))
        (staging / "metrics.json").write_text(
            json.dumps(
                {
                    "probabilities": str(probabilities),
                    "labels": str(labels),
                    "n_bins": n_bins,
                    "binning": binning,
                    "metrics": dict(rows),
                },
                indent=2,
            )
            + "\n"
        )
        reliability_diagram(
            probs,
            y,
            staging / "reliability.png",
            n_bins=n_bins,
            binning=binning,
            title=f"Reliability: {probabilities.name}",
        )
        publish_folder(staging, out)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the report ({exc.strerror or exc})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    typer.echo(f"wrote {out}/metrics.md, metrics.json, reliability.png")
