"""The "distilled ensemble" row: one network trained to reproduce a scenario's ensemble.

The student has the members' architecture and starts from the weights of the
scenario's best merge (the one-network merge with the lowest validation NLL,
copies of a single model left out). It learns the soft vote's probabilities
on the training images (Hinton et al.'s loss at temperature
:data:`TEMPERATURE`, with the training labels weighted ``1 - ALPHA``), stops
early on the validation images (the distillation loss against the soft
vote's validation predictions) and keeps its best epoch. It then runs one
network per prediction where the ensemble runs K.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modelfuse.demo.evaluate import Entry, log_probabilities, probabilities

__all__ = [
    "ALPHA",
    "TEMPERATURE",
    "DistilledSummary",
    "best_merge",
    "distil_ensemble",
    "soft_vote_log_probabilities",
]

TEMPERATURE = 4.0
"""Softening temperature of the distillation loss."""

ALPHA = 0.9
"""Weight of the ensemble's soft labels against the training labels' cross-entropy."""

PATIENCE = 5
"""Epochs without a lower validation loss before training stops."""

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DistilledSummary:
    """How a scenario's distilled row was made.

    Attributes
    ----------
    name : str
        The row's name.
    teacher : str
        The ensemble distilled (an entry name).
    teacher_cost : int
        Networks the ensemble runs per prediction.
    start : str
        The merge whose weights the student started from (an entry name).
    epochs, best_epoch : int
        Epochs run and the (1-based) epoch kept by early stopping.
    max_epochs : int
    val_agreement : float
        Share of validation images on which the student's top class is the ensemble's.
    path : Path or None
        The student's checkpoint folder (``model.safetensors``, ``config.json``).
    """

    name: str
    teacher: str
    teacher_cost: int
    start: str
    epochs: int
    best_epoch: int
    max_epochs: int
    val_agreement: float
    path: Path | None


def _nll(log_probs: np.ndarray, y: np.ndarray) -> float:
    lp = log_probabilities(log_probs)
    return float(-np.mean(lp[np.arange(len(y)), y]))


def best_merge(
    entries: Sequence[Entry], weights: Mapping[str, StateDict], y_val: np.ndarray
) -> str:
    """The merge with the lowest validation NLL among those with weights in ``weights``
    (one network each); on equal NLL the first in ``entries``.

    Examples
    --------
    >>> y = np.array([0, 1])
    >>> a = Entry("a", "merge", 1, "", np.log([[0.6, 0.4], [0.4, 0.6]]), np.zeros((1, 2)))
    >>> b = Entry("b", "merge", 1, "", np.log([[0.9, 0.1], [0.2, 0.8]]), np.zeros((1, 2)))
    >>> best_merge([a, b], {"a": {}, "b": {}}, y)
    'b'
    """
    pool = [e for e in entries if e.family == "merge" and e.name in weights]
    return min(pool, key=lambda e: _nll(e.val, y_val)).name


def soft_vote_log_probabilities(member_logits: Sequence[np.ndarray]) -> np.ndarray:
    """Log of the mean of the members' softmax probabilities, row by row.

    Examples
    --------
    >>> out = soft_vote_log_probabilities([np.log([[0.8, 0.2]]), np.log([[0.4, 0.6]])])
    >>> np.exp(out).round(6)
    array([[0.6, 0.4]])
    """
    mean = np.mean([probabilities(m) for m in member_logits], axis=0)
    return np.log(np.clip(mean, 1e-300, None))


def distil_ensemble(
    *,
    name: str,
    hidden: int,
    teacher: Entry,
    teacher_train: np.ndarray,
    start: str,
    start_weights: StateDict,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    x_test: np.ndarray,
    x_shift: np.ndarray | None,
    max_epochs: int,
    seed: int,
    folder: Path | None = None,
) -> tuple[Entry, DistilledSummary, StateDict]:
    """Distil ``teacher`` (an ensemble entry) into one network started from ``start_weights``.

    ``teacher_train`` holds the ensemble's log-probabilities on ``x_train``
    (its validation ones are ``teacher.val``). The student is scored on the
    validation, test and (when given) shifted images like every other
    candidate. With ``folder`` its weights are written there as a checkpoint
    folder.

    Returns
    -------
    entry : Entry
        Family ``"distilled"``, cost 1.
    summary : DistilledSummary
    state_dict : dict
        The student's weights.
    """
    from modelfuse.demo.evaluate import model_entry
    from modelfuse.demo.zoo import make_mlp, write_checkpoint
    from modelfuse.distill import Distiller

    distiller = Distiller(
        make_mlp(hidden),
        temperature=TEMPERATURE,
        alpha=ALPHA,
        max_epochs=max_epochs,
        batch_size=64,
        lr=1e-3,
        patience=PATIENCE,
        init_state_dict=start_weights,
        random_state=seed,
        n_threads=1,
    ).fit(
        x_train,
        y_train,
        X_val=x_val,
        teacher_logits=torch.as_tensor(teacher_train, dtype=torch.float32),
        val_teacher_logits=torch.as_tensor(teacher.val, dtype=torch.float32),
    )
    student = distiller.student_
    weights = {k: v.detach().clone() for k, v in student.state_dict().items()}
    details = (
        f"one {hidden}-unit MLP trained to reproduce the {teacher.name} ({teacher.cost} networks) "
        f"on the training images: KL to its probabilities at temperature {TEMPERATURE:g} "
        f"(weight {ALPHA:g}) plus the training labels' cross-entropy (weight {1 - ALPHA:.1g}); "
        f"started from {start}'s weights (the one-network merge with the lowest validation NLL); "
        f"early stopping on the validation images (patience {PATIENCE}): epoch "
        f"{distiller.best_epoch_} of {distiller.n_epochs_} run (at most {max_epochs}) kept, "
        f"top class equal to the ensemble's on {distiller.val_agreement_:.1%} of them"
    )
    entry = model_entry(name, "distilled", 1, details, student, weights, x_val, x_test, x_shift)
    path = None
    if folder is not None:
        config = {
            "architectures": ["DigitsMLP"],
            "model_type": "modelfuse-demo-mlp",
            "layer_sizes": [64, hidden, hidden, 10],
            "activation": "relu",
            "distilled": {
                "teacher": teacher.name,
                "start": start,
                "temperature": TEMPERATURE,
                "alpha": ALPHA,
                "best_epoch": int(distiller.best_epoch_),
                "epochs": int(distiller.n_epochs_),
                "max_epochs": int(max_epochs),
                "seed": int(seed),
            },
        }
        path = write_checkpoint(folder, weights, config)
    summary = DistilledSummary(
        name=name,
        teacher=teacher.name,
        teacher_cost=teacher.cost,
        start=start,
        epochs=int(distiller.n_epochs_),
        best_epoch=int(distiller.best_epoch_),
        max_epochs=int(max_epochs),
        val_agreement=float(distiller.val_agreement_ or 0.0),
        path=path,
    )
    return entry, summary, weights
