"""``modelfuse ensemble``: fit an ensemble of models' predictions, or apply a saved one."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer

from modelfuse.arrays import KIND_OPTIONS
from modelfuse.cli._app import app
from modelfuse.cli._inputs import InputsInOrder, named_files
from modelfuse.cli._output import check_output, refuse_output_over_inputs, write_atomically
from modelfuse.errors import ConfigError, DataError

__all__ = [
    "check_choice",
    "check_kind",
    "check_method",
    "ensemble_command",
    "labels_named",
    "metrics_table",
    "naming",
    "read_json",
    "read_labels",
    "read_named_predictions",
    "read_saved",
    "write_probabilities",
    "write_saved_json",
]

KINDS = ("probabilities", "logits")
KIND_HELP = "auto (rows summing to 1 are probabilities, others logits), probabilities or logits"
# Seeds go to numpy and scikit-learn, which take 0 <= seed < 2**32.
SEED_MAX = 2**32 - 1
T = TypeVar("T")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object saved at ``path``; ConfigError (one line) for anything else."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give the {what} written by modelfuse")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ConfigError(
            f"{path}: JSON nested too deeply; give the {what} written by modelfuse"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            f"give the {what} written by modelfuse"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot be read as a JSON {what} ({reason})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object holding a {what}")
    return value


def labels_named(exc: DataError, labels: Path | None) -> DataError:
    """``exc`` with a leading ``labels:`` (the library's name) replaced by the labels file."""
    message = str(exc)
    if labels is not None and message.startswith("labels: "):
        message = f"{labels}: {message[len('labels: ') :]}"
    return DataError(message)


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


def write_saved_json(out: Path, value: dict[str, Any]) -> None:
    """Write ``value`` as indented JSON to ``out``, atomically; NaN or infinity is refused."""
    try:
        text = json.dumps(value, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise DataError(
            f"{out}: the result holds NaN or infinite values; nothing was written"
        ) from None
    write_atomically(out, lambda stream: stream.write(text.encode()))


def check_kind(kind: str) -> str:
    """``kind`` if it is auto, probabilities or logits; else a ConfigError naming ``--kind``."""
    if kind not in KIND_OPTIONS:
        raise ConfigError(f"--kind: expected auto, probabilities or logits, got {str(kind)[:40]!r}")
    return kind


def check_choice(value: str, choices: Collection[str], option: str) -> str:
    """Refuse a ``value`` of ``option`` that is not one of ``choices``, listing them."""
    if value not in choices:
        raise ConfigError(
            f"{option}: unknown {str(value)[:40]!r}; expected one of {', '.join(choices)}"
        )
    return value


def check_method(method: str, registry: Collection[str]) -> str:
    """Refuse a ``--method`` that is not a key of ``registry``, listing the valid ones."""
    return check_choice(method, registry, "--method")


def read_named_predictions(
    named: dict[str, str], kind: str, *, option: str = "--predictions"
) -> tuple[np.ndarray, str]:
    """Load one (n_samples, n_classes) file per name and resolve ``kind`` (auto) from the rows.

    Returns the stacked (n_models, n_samples, n_classes) array and its kind;
    every file must hold the same kind. Errors name the file and the flag.
    """
    from modelfuse.arrays import load_array, resolve_kind
    from modelfuse.ensemble.voting import check_ensemble_predictions

    if not named:
        raise ConfigError(f"{option}: give at least one file, e.g. {option} a.npy b.npy")
    arrays = [load_array(path) for path in named.values()]
    kinds = [resolve_kind(a, kind, source=path) for a, path in zip(arrays, named.values())]
    paths = list(named.values())
    for path, found in zip(paths, kinds):
        if found != kinds[0]:
            raise DataError(
                f"{path}: holds {found} but {paths[0]} holds {kinds[0]}; give every model's "
                "predictions as the same kind"
            )
    return check_ensemble_predictions(arrays, kinds[0], sources=paths), kinds[0]


def read_labels(path: Path, n_samples: int, n_classes: int) -> np.ndarray:
    """Integer labels from ``path``, one per sample, in ``[0, n_classes)``; errors name the file."""
    from modelfuse.arrays import check_labels, load_array

    return check_labels(
        load_array(path), n_samples=n_samples, n_classes=n_classes, source=str(path)
    )


def write_probabilities(
    out: Path, probs: np.ndarray, labels: Path | None, *, name: str, quiet: bool = False
) -> None:
    """Write applied probabilities to ``out`` (.npy), after their metrics row when labelled."""
    if labels is not None:
        y = read_labels(labels, probs.shape[0], probs.shape[1])
        if not quiet:
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


def _parse_weights(text: str | None, n_models: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--weights: expected comma-separated numbers such as 1,2,1, got {text[:60]!r}"
        ) from None
    if len(weights) != n_models:
        raise ConfigError(
            f"--weights: {len(weights)} weights for {n_models} models; give one per "
            "--predictions file, in the same order"
        )
    if not all(np.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"--weights: expected finite numbers >= 0 with a positive sum, got {text[:60]!r}"
        )
    return weights


@app.command(
    "ensemble",
    cls=InputsInOrder,
    help="""Combine several models' predictions on the same samples into one.

Fit on validation predictions and labels, writing the ensemble as JSON:

    modelfuse ensemble --predictions a.npy b.npy c.npy --labels y.npy
        --method caruana -o ENSEMBLE.json

Apply a saved ensemble to new predictions of the same models, writing the
ensemble's probabilities:

    modelfuse ensemble --apply ENSEMBLE.json --predictions a=a_test.npy
        b=b_test.npy c=c_test.npy -o test_probs.npy

Inputs are NAME=FILE or FILE (named after the file), repeated (-p a.npy -p
b.npy) or space-separated (-p a.npy b.npy); the names are saved in the
ensemble and shown in the tables. On --apply, files named as the saved
members are matched by name, others by position. --kind auto (the default)
takes files whose rows sum to 1 as probabilities and others as logits.

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
        list[str] | None,
        typer.Option("--predictions", "-p", help="NAME=FILE or FILE of one model; more may follow"),
    ] = None,
    more: Annotated[
        list[str] | None, typer.Argument(help="further predictions files", show_default=False)
    ] = None,
    labels: Annotated[Path | None, typer.Option("--labels", "-y", help="integer labels")] = None,
    kind: Annotated[str, typer.Option(help=KIND_HELP)] = "auto",
    method: Annotated[str, typer.Option(help="soft, learned, caruana or stacking")] = "soft",
    apply: Annotated[
        Path | None, typer.Option(help="a saved ENSEMBLE.json to apply to the predictions")
    ] = None,
    weights: Annotated[str | None, typer.Option(help="soft: comma-separated weights")] = None,
    average: Annotated[
        str, typer.Option(help="soft: average probabilities or logits")
    ] = "probabilities",
    n_rounds: Annotated[
        int, typer.Option(help="caruana: rounds of selection", min=1, max=10_000)
    ] = 25,
    metric: Annotated[str, typer.Option(help="caruana: nll, brier or accuracy")] = "nll",
    n_init: Annotated[
        int, typer.Option(help="caruana: start with the N best members", min=0, max=10_000)
    ] = 0,
    n_bags: Annotated[
        int, typer.Option(help="caruana: bags of half the members (0: none)", min=0, max=1000)
    ] = 0,
    cv: Annotated[
        int, typer.Option(help="stacking: folds for the out-of-fold score", min=2, max=100)
    ] = 5,
    seed: Annotated[
        int, typer.Option(help="seed of tie-breaks, bags and folds", min=0, max=SEED_MAX)
    ] = 0,
    quiet: Annotated[
        bool, typer.Option(help="no tables; errors, warnings and 'wrote' stay")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
) -> None:
    check_kind(kind)
    named = named_files([*(predictions or []), *(more or [])], option="--predictions")
    inputs: dict[str, Path | str | None] = {f"--predictions {n}": p for n, p in named.items()}
    inputs.update({"--labels": labels, "--apply": apply})
    if apply is not None:
        refuse_output_over_inputs(out, inputs)
        check_output(out, suffix=".npy", overwrite=overwrite)
        _apply(apply, named, labels, kind, out, quiet)
        return
    from modelfuse.ensemble.saved import ENSEMBLE_METHODS, fit_ensemble
    from modelfuse.ensemble.selection import SELECTION_METRICS

    check_method(method, ENSEMBLE_METHODS)
    check_choice(metric, SELECTION_METRICS, "--metric")
    check_choice(average, KINDS, "--average")
    if weights is not None and method != "soft":
        raise ConfigError(
            f"--weights: applies to --method soft, not {method} (which learns its weights); "
            "drop --weights"
        )
    if labels is None and method != "soft":
        raise ConfigError(f"--labels: method {method} learns from validation labels; give them")
    refuse_output_over_inputs(out, inputs)
    check_output(out, suffix=".json", overwrite=overwrite)
    p, found_kind = read_named_predictions(named, kind)
    y = read_labels(labels, p.shape[1], p.shape[2]) if labels is not None else None
    options: dict[str, Any] = {"random_state": seed}
    if method == "soft":
        options.update(weights=_parse_weights(weights, p.shape[0]), average=average)
    elif method == "caruana":
        options.update(n_rounds=n_rounds, metric=metric, n_init=n_init, n_bags=n_bags)
    elif method == "stacking":
        options.update(cv=cv)
    try:
        saved, probs = fit_ensemble(
            p,
            y,
            kind=found_kind,  # type: ignore[arg-type]
            method=method,
            members=list(named),
            **options,
        )
    except DataError as exc:
        raise labels_named(exc, labels) from None
    saved["member_files"] = list(named.values())
    if y is not None:
        from modelfuse.ensemble.voting import member_probabilities

        member_p = member_probabilities(p, found_kind)  # type: ignore[arg-type]
        rows = {name: member_p[i] for i, name in enumerate(named)}
        label = "ensemble (out-of-fold)" if method == "stacking" else "ensemble"
        rows[label] = probs
        table, records = metrics_table(rows, y)
        saved["validation"] = records
        if not quiet:
            typer.echo(table)
    if saved.get("weights") is not None and not quiet:
        shown = ", ".join(f"{name} {w:.3f}" for name, w in zip(named, saved["weights"]))
        typer.echo(f"weights: {shown}")
    selection = saved.get("selection")
    if selection is not None and not quiet:
        typer.echo(
            f"selection: {selection['metric']} {selection['loss']:.4f}, "
            f"{selection['gain']:.4f} better than the best member; selected members' "
            f"disagreement {selection['disagreement']:.3f}, mutual information "
            f"{selection['mutual_information']:.4f} nats"
        )
    write_saved_json(out, saved)
    typer.echo(f"wrote {out}")


def _apply(
    saved_path: Path,
    named: dict[str, str],
    labels: Path | None,
    kind: str,
    out: Path,
    quiet: bool,
) -> None:
    from modelfuse.ensemble.saved import apply_ensemble, check_saved_ensemble

    saved = read_saved(saved_path, "ensemble", check_saved_ensemble)
    if not named:
        raise ConfigError("--predictions: give one file per model of the saved ensemble")
    if len(named) != saved["n_models"]:
        raise ConfigError(
            f"--predictions: {saved_path} combines {saved['n_models']} models, "
            f"got {len(named)} files; give one per model, in the same order"
        )
    members = saved.get("members")
    if members is not None and set(named) == set(members):
        named = {name: named[name] for name in members}  # matched by name
    p, found_kind = read_named_predictions(named, kind)
    if found_kind != saved["kind"]:
        first = next(iter(named.values()))
        raise DataError(
            f"{first}: holds {found_kind}, but {saved_path} was fitted on {saved['kind']}; "
            f"give the models' {saved['kind']} (pass --kind {saved['kind']} if the files hold "
            f"{saved['kind']})"
        )
    if p.shape[2] != saved["n_classes"]:
        raise DataError(
            f"{next(iter(named.values()))}: {p.shape[2]} classes, but {saved_path} was fitted "
            f"on {saved['n_classes']}; give the same models' predictions"
        )
    write_probabilities(out, apply_ensemble(saved, p), labels, name="ensemble", quiet=quiet)
