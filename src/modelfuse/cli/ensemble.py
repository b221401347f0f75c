"""``modelfuse ensemble``: fit an ensemble of models' predictions, or apply a saved one."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer

from modelfuse.cli._app import app
from modelfuse.cli._output import check_output, write_atomically, write_json
from modelfuse.errors import ConfigError

__all__ = [
    "check_kind",
    "check_method",
    "ensemble_command",
    "metrics_table",
    "naming",
    "read_json",
    "read_labels",
    "read_predictions",
    "read_saved",
    "write_probabilities",
]

KINDS = ("probabilities", "logits")
T = TypeVar("T")


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give the {what} written by modelfuse")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON {what} ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object holding a {what}")
    return value


def naming(path: Path, exc: ConfigError) -> ConfigError:
    """``exc`` with its message prefixed by ``path`` unless it names it already."""
    message = str(exc)
    return ConfigError(message if str(path) in message else f"{path}: {message}")


def read_saved(path: Path, what: str, parse: Callable[[dict[str, Any]], T]) -> T:
    """``parse`` of the JSON ``what`` saved at ``path``; its ConfigErrors name ``path``."""
    try:
        return parse(read_json(path, what))
    except ConfigError as exc:
        raise naming(path, exc) from None


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"--kind: expected probabilities or logits, got {kind!r}")
    return kind


def check_method(method: str, registry: Collection[str]) -> str:
    """Refuse a ``--method`` that is not a key of ``registry``, listing the valid ones."""
    if method not in registry:
        raise ConfigError(f"--method: unknown {method!r}; expected one of {', '.join(registry)}")
    return method


def read_predictions(paths: list[Path], kind: str) -> np.ndarray:
    """Load one (n_samples, n_classes) file per model; errors name the file."""
    from modelfuse.arrays import load_array
    from modelfuse.ensemble.voting import check_ensemble_predictions

    if not paths:
        raise ConfigError("--predictions: give at least one file, e.g. --predictions a.npy b.npy")
    arrays = [load_array(p) for p in paths]
    return check_ensemble_predictions(arrays, kind, sources=[str(p) for p in paths])


def read_labels(path: Path, n_samples: int, n_classes: int) -> np.ndarray:
    from modelfuse.arrays import check_labels, load_array

    return check_labels(
        load_array(path), n_samples=n_samples, n_classes=n_classes, source=str(path)
    )


def write_probabilities(
    out: Path, probs: np.ndarray, labels: Path | None, *, name: str
) -> None:
    """Write applied probabilities to ``out`` (.npy), after their metrics row when labelled."""
    if labels is not None:
        y = read_labels(labels, probs.shape[0], probs.shape[1])
        typer.echo(metrics_table({name: probs}, y)[0])
    write_atomically(out, lambda stream: np.save(stream, probs))
    typer.echo(f"wrote {out} (probabilities, shape {probs.shape})")


def metrics_table(rows: dict[str, np.ndarray], labels: np.ndarray) -> tuple[str, list[dict]]:
    """A plain-text table of NLL, accuracy, Brier and ECE per named probability array."""
    from modelfuse.calibration.metrics import (
        brier_score,
        expected_calibration_error,
        negative_log_likelihood,
    )

    records = []
    for name, probs in rows.items():
        records.append(
            {
                "name": name,
                "nll": negative_log_likelihood(probs, labels),
                "accuracy": float((probs.argmax(axis=1) == labels).mean()),
                "brier": brier_score(probs, labels),
                "ece": expected_calibration_error(probs, labels),
            }
        )
    width = max(len("model"), *(len(r["name"]) for r in records))
    lines = [f"{'model':<{width}}  {'NLL':>8}  {'accuracy':>8}  {'Brier':>8}  {'ECE':>8}"]
    for r in records:
        lines.append(
            f"{r['name']:<{width}}  {r['nll']:8.4f}  {r['accuracy']:8.4f}  "
            f"{r['brier']:8.4f}  {r['ece']:8.4f}"
        )
    return "\n".join(lines), records


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights: expected comma-separated numbers, got {text!r}") from None


@app.command(
    "ensemble",
    help="""Combine several models' predictions on the same samples into one.

Fit on validation predictions and labels, writing the ensemble as JSON:

    modelfuse ensemble --predictions a.npy b.npy c.npy --labels y.npy
        --kind logits --method caruana -o ENSEMBLE.json

Apply a saved ensemble to new predictions of the same models (same order),
writing the ensemble's probabilities:

    modelfuse ensemble --apply ENSEMBLE.json --predictions a_test.npy
        b_test.npy c_test.npy -o test_probs.npy

Methods: soft (weighted soft voting; --weights 1,2,1), learned (weights
minimising validation NLL on the simplex), caruana (ensemble selection),
stacking (logistic regression on the members' probabilities, scored out
of fold). Files: .npy, .npz (FILE.npz:KEY), .csv, one per model, shaped
(n_samples, n_classes).
""",
)
def ensemble_command(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="ENSEMBLE.json (fit) or PROBS.npy (--apply)")
    ],
    predictions: Annotated[
        list[Path] | None,
        typer.Option("--predictions", "-p", help="one predictions file per model; more may follow"),
    ] = None,
    more: Annotated[
        list[Path] | None, typer.Argument(help="further predictions files", show_default=False)
    ] = None,
    labels: Annotated[Path | None, typer.Option("--labels", "-y", help="integer labels")] = None,
    kind: Annotated[
        str | None,
        typer.Option(help="what the files hold: probabilities or logits (required to fit)"),
    ] = None,
    method: Annotated[str, typer.Option(help="soft, learned, caruana or stacking")] = "soft",
    apply: Annotated[
        Path | None, typer.Option(help="a saved ENSEMBLE.json to apply to the predictions")
    ] = None,
    weights: Annotated[str | None, typer.Option(help="soft: comma-separated weights")] = None,
    average: Annotated[
        str, typer.Option(help="soft: average probabilities or logits")
    ] = "probabilities",
    n_rounds: Annotated[int, typer.Option(help="caruana: rounds of selection")] = 25,
    metric: Annotated[str, typer.Option(help="caruana: nll, brier or accuracy")] = "nll",
    n_init: Annotated[int, typer.Option(help="caruana: start with the N best members")] = 0,
    n_bags: Annotated[int, typer.Option(help="caruana: bags of half the members (0: none)")] = 0,
    cv: Annotated[int, typer.Option(help="stacking: folds for the out-of-fold score")] = 5,
    seed: Annotated[int, typer.Option(help="seed of tie-breaks, bags and folds")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
) -> None:
    paths = list(predictions or []) + list(more or [])
    if apply is not None:
        _apply(apply, paths, labels, kind, out, overwrite)
        return
    if kind is None:
        raise ConfigError("--kind: say what the files hold, probabilities or logits")
    check_kind(kind)
    check_output(out, suffix=".json", overwrite=overwrite)
    from modelfuse.ensemble.saved import ENSEMBLE_METHODS, fit_ensemble

    check_method(method, ENSEMBLE_METHODS)
    p = read_predictions(paths, kind)
    y = read_labels(labels, p.shape[1], p.shape[2]) if labels is not None else None
    if y is None and method != "soft":
        raise ConfigError(f"--labels: method {method} learns from validation labels; give them")
    options: dict[str, Any] = {"random_state": seed}
    if method == "soft":
        options.update(weights=_parse_weights(weights), average=average)
    elif method == "caruana":
        options.update(n_rounds=n_rounds, metric=metric, n_init=n_init, n_bags=n_bags)
    elif method == "stacking":
        options.update(cv=cv)
    saved, probs = fit_ensemble(p, y, kind=kind, method=method, **options)
    saved["members"] = [str(path) for path in paths]
    if y is not None:
        from modelfuse.ensemble.voting import member_probabilities

        member_p = member_probabilities(p, kind)
        rows = {str(path): member_p[i] for i, path in enumerate(paths)}
        label = "ensemble (out-of-fold)" if method == "stacking" else "ensemble"
        rows[label] = probs
        table, records = metrics_table(rows, y)
        saved["validation"] = records
        typer.echo(table)
    if saved.get("weights") is not None:
        shown = ", ".join(f"{w:.3f}" for w in saved["weights"])
        typer.echo(f"weights: {shown}")
    write_json(out, saved)
    typer.echo(f"wrote {out}")


def _apply(
    saved_path: Path,
    paths: list[Path],
    labels: Path | None,
    kind: str | None,
    out: Path,
    overwrite: bool,
) -> None:
    from modelfuse.ensemble.saved import apply_ensemble, check_saved_ensemble

    check_output(out, suffix=".npy", overwrite=overwrite)
    saved = read_saved(saved_path, "ensemble", check_saved_ensemble)
    saved_kind = saved.get("kind")
    if kind is not None and check_kind(kind) != saved_kind:
        raise ConfigError(
            f"--kind {kind}: {saved_path} was fitted on {saved_kind}; give the same kind of file"
        )
    if saved_kind not in KINDS:
        raise ConfigError(f'{saved_path}: not a modelfuse ensemble (no valid "kind")')
    p = read_predictions(paths, saved_kind)
    if p.shape[0] != saved.get("n_models"):
        raise ConfigError(
            f"--predictions: {saved_path} combines {saved.get('n_models')} models, "
            f"got {p.shape[0]} files; give one per model, in the same order"
        )
    if p.shape[2] != saved.get("n_classes"):
        raise ConfigError(
            f"{paths[0]}: {p.shape[2]} classes, but {saved_path} was fitted on "
            f"{saved.get('n_classes')}; give the same models' predictions"
        )
    write_probabilities(out, apply_ensemble(saved, p), labels, name="ensemble")
