"""``modelfuse distill``: train one network (the student) on a teacher's softened predictions."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from modelfuse.cli._app import app
from modelfuse.cli._inputs import named_files
from modelfuse.cli._output import (
    check_output,
    refuse_existing,
    refuse_output_over_inputs,
    require_parent_folder,
    write_atomically,
)
from modelfuse.errors import CheckpointError, ConfigError, DataError, ModelfuseError, OutputError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["distill_command"]

SEED_MAX = 2**32 - 1
KIND_HELP = (
    "of --teacher-logits files: auto (rows summing to 1 are probabilities, others logits), "
    "probabilities or logits"
)


def _positive(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"expected a finite number > 0, got {value}")
    return value


def _fraction(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and 0 < value < 1):
        raise typer.BadParameter(f"expected a number between 0 and 1 (both excluded), got {value}")
    return value


def _unit(value: float) -> float:
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise typer.BadParameter(f"expected a number in [0, 1], got {value}")
    return value


def _non_negative(value: float) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"expected a finite number >= 0, got {value}")
    return value


@app.command(
    "distill",
    help="""Distil a teacher (an ensemble of checkpoints, a merge, or saved logits) into one
network of the factory's architecture, the student, and write its weights.

Examples:

    modelfuse distill --factory my_models:make --inputs x.npy --labels y.npy
        --teacher a.safetensors b.safetensors c.safetensors --student merged/
        --validation-fraction 0.1 -o student.safetensors

    modelfuse distill --factory my_models:make --inputs x.npy
        --teacher-logits ensemble_logits.npy --soft-only -o student.safetensors

The factory (package.module:function, as for `modelfuse statistics`) takes no
arguments and returns a fresh model (or a (model, batches) pair, whose batches
are not used). Every --teacher checkpoint is loaded into a copy of it; several
are an ensemble averaged in probability space (--average logits for a geometric
mean). --teacher-logits gives the teacher's outputs on --inputs instead, row
for row. The student starts from --student (e.g. a merge of the teachers) or
from the factory's own weights (drawn with --seed). Loss: alpha * T^2 * KL(teacher_T || student_T)
+ (1 - alpha) * cross-entropy with --labels; without labels, or with
--soft-only, the KL term alone. With validation data (--val-inputs or
--validation-fraction) training stops after --patience epochs without a lower
validation loss and the best epoch's weights are written. OUT.json (or
--summary) holds the loss per epoch, the best epoch and the agreement with the
teacher.
""",
)
def distill_command(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="the student's weights, a .safetensors file")
    ],
    factory: Annotated[
        str, typer.Option(help="package.module:function returning the (untrained) model")
    ],
    inputs: Annotated[
        Path,
        typer.Option(
            "--inputs", "-x", help="training inputs (.npy, .npz, .csv), one row per example"
        ),
    ],
    teacher: Annotated[
        list[str] | None,
        typer.Option(
            "--teacher", "-t", help="NAME=CKPT or CKPT of one teacher member; more may follow"
        ),
    ] = None,
    more: Annotated[
        list[str] | None, typer.Argument(help="further teacher checkpoints", show_default=False)
    ] = None,
    teacher_logits: Annotated[
        Path | None,
        typer.Option(
            help="the teacher's logits or probabilities on --inputs, instead of --teacher"
        ),
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", "-y", help="integer labels of --inputs")
    ] = None,
    val_inputs: Annotated[
        Path | None, typer.Option(help="validation inputs for early stopping")
    ] = None,
    val_labels: Annotated[Path | None, typer.Option(help="integer labels of --val-inputs")] = None,
    val_teacher_logits: Annotated[
        Path | None,
        typer.Option(help="the teacher's outputs on --val-inputs (with --teacher-logits)"),
    ] = None,
    validation_fraction: Annotated[
        float | None,
        typer.Option(
            help="hold out this fraction of --inputs for early stopping", callback=_fraction
        ),
    ] = None,
    student: Annotated[
        Path | None,
        typer.Option(help="checkpoint the student starts from (default: the factory's weights)"),
    ] = None,
    kind: Annotated[str, typer.Option(help=KIND_HELP)] = "auto",
    average: Annotated[
        str,
        typer.Option(help="how several --teacher members are combined: probabilities or logits"),
    ] = "probabilities",
    temperature: Annotated[
        float, typer.Option(help="softens both distributions (> 0)", callback=_positive)
    ] = 4.0,
    alpha: Annotated[
        float,
        typer.Option(
            help="weight of the teacher's term against the labels' (in [0, 1])", callback=_unit
        ),
    ] = 0.9,
    soft_only: Annotated[
        bool, typer.Option(help="learn from the teacher's soft labels only (MEAL V2)")
    ] = False,
    epochs: Annotated[int, typer.Option(help="most epochs of training", min=1, max=100_000)] = 20,
    batch_size: Annotated[int, typer.Option(help="examples per step", min=1)] = 64,
    lr: Annotated[float, typer.Option(help="learning rate (> 0)", callback=_positive)] = 1e-3,
    weight_decay: Annotated[
        float, typer.Option(help="weight decay (>= 0)", callback=_non_negative)
    ] = 0.0,
    optimizer: Annotated[str, typer.Option(help="adam, adamw or sgd (momentum 0.9)")] = "adam",
    patience: Annotated[
        int, typer.Option(help="epochs without a lower validation loss before stopping", min=1)
    ] = 5,
    seed: Annotated[
        int,
        typer.Option(
            help="seed of the factory's weights, the validation split, shuffling and dropout",
            min=0,
            max=SEED_MAX,
        ),
    ] = 0,
    threads: Annotated[
        int | None,
        typer.Option(help="torch threads while training (default: torch's choice)", min=1),
    ] = None,
    summary: Annotated[
        Path | None, typer.Option(help="the JSON summary (default: OUT with suffix .json)")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar; errors and 'wrote' stay")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="replace OUT and the summary if they exist")
    ] = False,
) -> None:
    from modelfuse.arrays import KIND_OPTIONS
    from modelfuse.distill import OPTIMIZERS

    if kind not in KIND_OPTIONS:
        raise ConfigError(f"--kind: expected auto, probabilities or logits, got {kind[:40]!r}")
    if average not in ("probabilities", "logits"):
        raise ConfigError(f"--average: expected probabilities or logits, got {average[:40]!r}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"--optimizer: unknown {optimizer[:40]!r}; expected one of {', '.join(OPTIMIZERS)}"
        )
    members = named_files([*(teacher or []), *(more or [])], option="--teacher")
    if members and teacher_logits is not None:
        raise ConfigError(
            "give the teacher as --teacher CKPT ... or as --teacher-logits FILE, not both"
        )
    if not members and teacher_logits is None:
        raise ConfigError(
            "no teacher: give --teacher CKPT (one or more checkpoints of the factory's model) "
            "or --teacher-logits FILE (its outputs on --inputs)"
        )
    if val_inputs is None and (val_labels is not None or val_teacher_logits is not None):
        raise ConfigError("--val-labels and --val-teacher-logits need --val-inputs")
    if val_inputs is not None and validation_fraction is not None:
        raise ConfigError("give either --val-inputs or --validation-fraction, not both")
    if val_teacher_logits is not None and teacher_logits is None:
        raise ConfigError(
            "--val-teacher-logits goes with --teacher-logits; with --teacher the checkpoints "
            "are run on --val-inputs"
        )
    if val_inputs is not None and teacher_logits is not None and val_teacher_logits is None:
        raise ConfigError(
            "--val-inputs with --teacher-logits needs --val-teacher-logits (the teacher's "
            "outputs on --val-inputs)"
        )
    summary_path = summary if summary is not None else out.with_suffix(".json")
    given: dict[str, Path | str | None] = {f"--teacher {n}": p for n, p in members.items()}
    given.update(
        {
            "--inputs": inputs,
            "--labels": labels,
            "--teacher-logits": teacher_logits,
            "--val-inputs": val_inputs,
            "--val-labels": val_labels,
            "--val-teacher-logits": val_teacher_logits,
            "--student": student,
        }
    )
    refuse_output_over_inputs(out, given)
    check_output(out, suffix=".safetensors", overwrite=overwrite)
    if summary_path.suffix.lower() != ".json":
        raise ConfigError(f"--summary {summary_path}: expected a .json file; name it SUMMARY.json")
    refuse_output_over_inputs(summary_path, given)
    refuse_existing(summary_path, overwrite=overwrite)
    if summary_path.is_dir():
        raise OutputError(f"{summary_path}: is a folder; choose a file name for --summary")
    require_parent_folder(summary_path)

    model = _model(factory, seed)
    x = _inputs(inputs, "--inputs")
    x_val = None if val_inputs is None else _inputs(val_inputs, "--val-inputs", like=(x, inputs))
    if members:
        teachers = [
            _load(copy.deepcopy(model), path, f"--teacher {path}", factory)
            for path in members.values()
        ]
        t = _run_teachers(teachers, x, inputs, average, members)
        t_val = (
            None if x_val is None else _run_teachers(teachers, x_val, val_inputs, average, members)
        )
    elif teacher_logits is not None:
        t = _given_logits(teacher_logits, kind, rows=x.shape[0], against=f"--inputs {inputs}")
        t_val = (
            None
            if val_teacher_logits is None or x_val is None
            else _given_logits(
                val_teacher_logits,
                kind,
                rows=x_val.shape[0],
                against=f"--val-inputs {val_inputs}",
                option="--val-teacher-logits",
            )
        )
        if t_val is not None and t_val.shape[1] != t.shape[1]:
            raise DataError(
                f"--val-teacher-logits {val_teacher_logits}: {t_val.shape[1]} classes, "
                f"--teacher-logits {t.shape[1]}; expected the same classes"
            )
    n_classes = int(t.shape[1])
    y = None if labels is None else _labels(labels, x.shape[0], n_classes, "--labels")
    y_val = (
        None
        if val_labels is None or x_val is None
        else _labels(val_labels, x_val.shape[0], n_classes, "--val-labels")
    )
    if student is not None:
        model = _load(model, student, f"--student {student}", factory)

    from modelfuse.distill import Distiller

    distiller = Distiller(
        model,
        temperature=temperature,
        alpha=alpha,
        soft_only=soft_only,
        max_epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        optimizer=optimizer,  # type: ignore[arg-type]
        validation_fraction=validation_fraction,
        patience=patience,
        random_state=seed,
        n_threads=threads,
        progress=not quiet,
    )
    try:
        distiller.fit(x, y, X_val=x_val, y_val=y_val, teacher_logits=t, val_teacher_logits=t_val)
    except ModelfuseError as exc:
        raise type(exc)(_reworded(str(exc), factory=factory, inputs=inputs)) from None
    _write(
        distiller,
        out,
        summary_path,
        _record(
            distiller,
            factory=factory,
            inputs=inputs,
            labels=labels,
            members=members,
            teacher_logits=teacher_logits,
            student=student,
            validation=(
                str(val_inputs)
                if val_inputs is not None
                else None
                if validation_fraction is None
                else f"{validation_fraction} of --inputs"
            ),
            options={
                "temperature": temperature,
                "alpha": alpha,
                "soft_only": soft_only,
                "average": average if len(members) > 1 else None,
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "weight_decay": weight_decay,
                "optimizer": optimizer,
                "patience": patience,
                "seed": seed,
            },
        ),
    )
    where = "validation" if distiller.val_agreement_ is not None else "training"
    agree = (
        distiller.val_agreement_
        if distiller.val_agreement_ is not None
        else distiller.train_agreement_
    )
    teacher_text = (
        f"{len(members)} teacher checkpoint{'s' if len(members) != 1 else ''}"
        if members
        else f"the teacher logits {teacher_logits}"
    )
    print(
        f"wrote the student distilled from {teacher_text} (best epoch {distiller.best_epoch_} "
        f"of {distiller.n_epochs_}, agreement with the teacher {agree:.4f} on the {where} "
        f"data) to {out}, and its summary to {summary_path}"
    )


def _spec(factory: str) -> str:
    """The --factory value as messages show it (at most 80 characters)."""
    return factory if len(factory) <= 80 else factory[:77] + "..."


def _model(factory: str, seed: int) -> nn.Module:
    """The factory's model: its result, or the first item of a (model, batches) pair.

    The factory runs with torch's global generator seeded by ``--seed`` (and
    restored after), so that its fresh weights are the same on every run.
    """
    import torch
    from torch import nn

    from modelfuse.cli.statistics import call_factory

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result = call_factory(factory)
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], nn.Module):
        result = result[0]
    if not isinstance(result, nn.Module):
        raise ConfigError(
            f"--factory: {_spec(factory)} returned {type(result).__name__}; expected a torch.nn.Module "
            "(or a pair (model, batches) as for modelfuse statistics)"
        )
    return result


def _inputs(path: Path, option: str, like: tuple[torch.Tensor, Path] | None = None) -> torch.Tensor:
    from modelfuse.arrays import load_array
    from modelfuse.distill.data import as_inputs

    x = as_inputs(load_array(path), source=f"{option} {path}")
    if like is not None and x.shape[1:] != like[0].shape[1:]:
        raise DataError(
            f"{option} {path}: rows of shape {tuple(x.shape[1:])}, --inputs {like[1]} "
            f"{tuple(like[0].shape[1:])}; expected the same shape"
        )
    return x


def _labels(path: Path, n_samples: int, n_classes: int, option: str) -> torch.Tensor:
    import torch

    from modelfuse.arrays import check_labels, load_array

    array = check_labels(
        load_array(path), n_samples=n_samples, n_classes=n_classes, source=f"{option} {path}"
    )
    return torch.from_numpy(array)


def _load(model: nn.Module, path: Path | str, option: str, factory: str) -> nn.Module:
    """``model`` holding the checkpoint at ``path`` (every tensor, nothing more)."""
    from modelfuse.checkpoint import open_checkpoint

    expected = model.state_dict()
    with open_checkpoint(path) as checkpoint:
        names = checkpoint.keys()
        missing = [name for name in expected if name not in names]
        extra = [name for name in names if name not in expected]
        shapes = [
            f"{name} {tuple(checkpoint.info(name).shape)}, the model {tuple(expected[name].shape)}"
            for name in names
            if name in expected
            and tuple(checkpoint.info(name).shape) != tuple(expected[name].shape)
        ]
        problems = [
            *([f"missing {_listed(missing)}"] if missing else []),
            *([f"unexpected {_listed(extra)}"] if extra else []),
            *([f"shapes differ: {_listed(shapes)}"] if shapes else []),
        ]
        if problems:
            raise CheckpointError(
                f"{option}: does not fit the model of --factory {_spec(factory)} "
                f"({'; '.join(problems)}); give a checkpoint of that architecture"
            )
        state = {name: checkpoint.read(name) for name in names}
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as exc:  # e.g. a dtype the model cannot take
        text = " ".join(str(exc).split())
        raise CheckpointError(
            f"{option}: cannot be loaded into the model of --factory {_spec(factory)} ({text[:120]})"
        ) from None
    return model


def _listed(items: list[str]) -> str:
    shown = ", ".join(item[:60] for item in items[:3])
    return shown + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def _run_teachers(
    teachers: list[nn.Module],
    x: torch.Tensor,
    path: Path | None,
    average: str,
    members: dict[str, str],
) -> torch.Tensor:
    from modelfuse.distill import teacher_logits

    try:
        return teacher_logits(teachers, x, average=average)  # type: ignore[arg-type]
    except (RuntimeError, ValueError, IndexError) as exc:
        if isinstance(exc, ModelfuseError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = (
            "" if x.is_floating_point() else " (as int64: save them as floats if it takes floats)"
        )
        raise DataError(
            f"--teacher {next(iter(members.values()))}: the factory's model cannot run on "
            f"{path} of shape {tuple(x.shape)} ({first[:160]}); give inputs it takes{hint}"
        ) from None


def _given_logits(
    path: Path, kind: str, *, rows: int, against: str, option: str = "--teacher-logits"
) -> torch.Tensor:
    """The teacher's logits from a file (probabilities are turned into log-probabilities)."""
    import numpy as np
    import torch

    from modelfuse.arrays import check_predictions, load_array, resolve_kind

    source = f"{option} {path}"
    array = load_array(path)
    found = resolve_kind(array, kind, source=source)
    checked = check_predictions(array, found, source=source, option="--kind")
    if checked.ndim != 2 or checked.shape[0] != rows or checked.shape[1] < 2:
        raise DataError(
            f"{source}: shape {checked.shape}, but {against} has {rows} rows; expected the "
            f"teacher's outputs on it, shaped ({rows}, n_classes) with at least 2 classes"
        )
    if found == "probabilities":
        with np.errstate(divide="ignore"):
            checked = np.log(np.clip(checked, 0.0, None))
    return torch.from_numpy(np.ascontiguousarray(checked, dtype=np.float32))


def _reworded(message: str, *, factory: str, inputs: Path) -> str:
    """The library's keyword names in a message as the command line's flags."""
    prefixes = {
        "student:": f"--factory {_spec(factory)}: the model",
        "validation_fraction:": "--validation-fraction:",
        "X:": f"--inputs {inputs}:",
    }
    for old, new in prefixes.items():
        if message.startswith(old):
            message = new + message[len(old) :]
            break
    return message.replace("lower lr", "lower --lr")


def _record(distiller: Any, **fields: Any) -> dict[str, Any]:
    members = fields["members"]
    return {
        "factory": fields["factory"],
        "inputs": str(fields["inputs"]),
        "labels": None if fields["labels"] is None else str(fields["labels"]),
        "teacher": dict(members) if members else None,
        "teacher_logits": None
        if fields["teacher_logits"] is None
        else str(fields["teacher_logits"]),
        "student_init": "factory" if fields["student"] is None else str(fields["student"]),
        "validation": fields["validation"],
        "options": fields["options"],
        "n_train": distiller.n_train_,
        "n_val": distiller.n_val_,
        "n_classes": distiller.n_classes_,
        "epochs_run": distiller.n_epochs_,
        "best_epoch": distiller.best_epoch_,
        "history": {key: list(values) for key, values in distiller.history_.items()},
        "train_agreement": distiller.train_agreement_,
        "val_agreement": distiller.val_agreement_,
    }


def _write(distiller: Any, out: Path, summary: Path, record: dict[str, Any]) -> None:
    from safetensors.torch import save

    state = {
        k: v.detach().cpu().clone().contiguous() for k, v in distiller.student_.state_dict().items()
    }
    data = save(state, metadata={"format": "pt"})
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    write_atomically(out, lambda stream: stream.write(data))
    write_atomically(summary, lambda stream: stream.write(text.encode()))
