"""Weighted soft voting over arrays of predictions shaped (n_models, n_samples, n_classes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from modelfuse.arrays import check_predictions
from modelfuse.calibration.softmax import softmax, to_log_probabilities
from modelfuse.errors import DataError

__all__ = ["check_ensemble_predictions", "check_weights", "member_probabilities", "soft_vote"]

Kind = Literal["probabilities", "logits"]


def check_ensemble_predictions(
    predictions: np.ndarray | Sequence[np.ndarray],
    kind: Kind,
    *,
    sources: Sequence[str] | None = None,
) -> np.ndarray:
    """Check the members' predictions and return them as one (n_models, n_samples, n_classes) array.

    Parameters
    ----------
    predictions : array of shape (n_models, n_samples, n_classes), or a sequence of
        (n_samples, n_classes) arrays
    kind : {"probabilities", "logits"}
        Never guessed; see :func:`modelfuse.arrays.check_predictions`.
    sources : sequence of str, optional
        One name per member (file names on the command line) for messages.

    Raises
    ------
    DataError
        A member is malformed, or the members' shapes differ.

    Examples
    --------
    >>> import numpy as np
    >>> check_ensemble_predictions([np.zeros((4, 3)), np.ones((4, 3))], "logits").shape
    (2, 4, 3)
    """
    if isinstance(predictions, np.ndarray) and sources is None:
        if predictions.ndim != 3:
            raise DataError(
                f"predictions: expected shape (n_models, n_samples, n_classes), "
                f"got {predictions.shape}"
            )
        return check_predictions(predictions, kind, source="predictions")
    members = list(predictions)
    if not members:
        raise DataError("predictions: no members given; expected at least one array")
    if sources is None:
        sources = [f"predictions[{i}]" for i in range(len(members))]
    names = list(sources)
    if len(names) != len(members):
        raise DataError(f"sources: {len(names)} names for {len(members)} members")
    checked = []
    for name, member in zip(names, members, strict=True):
        array = check_predictions(member, kind, source=name)
        if array.ndim != 2:
            raise DataError(f"{name}: expected shape (n_samples, n_classes), got {array.shape}")
        if checked and array.shape != checked[0].shape:
            raise DataError(
                f"{name}: shape {array.shape} differs from {names[0]}'s {checked[0].shape}; "
                "every model must predict the same samples and classes"
            )
        checked.append(array)
    return np.stack(checked)


def check_weights(weights: np.ndarray | Sequence[float] | None, n_models: int) -> np.ndarray:
    """Non-negative weights, one per model, normalised to sum to one (uniform when None).

    Examples
    --------
    >>> check_weights([1, 3], 2)
    array([0.25, 0.75])
    """
    if weights is None:
        return np.full(n_models, 1.0 / n_models)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_models,):
        raise DataError(
            f"weights: expected {n_models} weights (one per model), got shape {w.shape}"
        )
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise DataError(
            f"weights: expected finite non-negative numbers with a positive sum, got {w}"
        )
    return w / w.sum()


def member_probabilities(predictions: np.ndarray, kind: Kind) -> np.ndarray:
    """Each member's probabilities (softmax of logits; probabilities unchanged).

    Examples
    --------
    >>> import numpy as np
    >>> member_probabilities(np.zeros((1, 1, 2)), "logits")
    array([[[0.5, 0.5]]])
    """
    return softmax(predictions) if kind == "logits" else predictions


def soft_vote(
    predictions: np.ndarray | Sequence[np.ndarray],
    *,
    kind: Kind,
    weights: np.ndarray | Sequence[float] | None = None,
    average: Literal["probabilities", "logits"] = "probabilities",
) -> np.ndarray:
    """Weighted soft voting: ``sum_m w_m p_m`` with the weights normalised to sum to one.

    Parameters
    ----------
    predictions : array of shape (n_models, n_samples, n_classes) or a sequence of
        (n_samples, n_classes) arrays
    kind : {"probabilities", "logits"}
        What the members' numbers are (never guessed). Logits are softmaxed
        member by member before averaging.
    weights : array of shape (n_models,), optional
        Non-negative; uniform when omitted.
    average : {"probabilities", "logits"}, default "probabilities"
        ``"logits"`` averages the logits (log-probabilities for
        ``kind="probabilities"``) and softmaxes the average, a geometric mean
        of the members' probabilities; used only when asked for.

    Returns
    -------
    array of shape (n_samples, n_classes)
        Probabilities, in the input's floating dtype.

    References
    ----------
    Kuncheva. Combining Pattern Classifiers. Wiley, 2004 (ch. 5).

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[0.9, 0.1]]); b = np.array([[0.5, 0.5]])
    >>> soft_vote([a, b], kind="probabilities", weights=[3, 1])
    array([[0.8, 0.2]])
    """
    if average not in ("probabilities", "logits"):
        raise DataError(f"average: expected 'probabilities' or 'logits', got {average!r}")
    p = check_ensemble_predictions(predictions, kind)
    w = check_weights(weights, p.shape[0])
    dtype = p.dtype
    if average == "logits":
        total = np.zeros(p.shape[1:], dtype=dtype)
        for m in range(p.shape[0]):
            member = p[m] if kind == "logits" else to_log_probabilities(p[m], "probabilities")
            total += dtype.type(w[m]) * member
        return softmax(total)
    if kind == "probabilities":
        return np.tensordot(w.astype(dtype), p, axes=(0, 0))
    total = np.zeros(p.shape[1:], dtype=dtype)
    for m in range(p.shape[0]):  # one member at a time: memory of one member, not all
        total += dtype.type(w[m]) * softmax(p[m])
    return total
