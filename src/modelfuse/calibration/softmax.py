"""Numerically stable softmax, log-softmax and sigmoid, and kind conversions."""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["log_softmax", "sigmoid", "softmax", "to_log_probabilities", "to_probabilities"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``z - logsumexp(z)`` over the last axis, computed without overflow.

    Examples
    --------
    >>> import numpy as np
    >>> np.exp(log_softmax(np.array([[0.0, 0.0]])))
    array([[0.5, 0.5]])
    """
    z = np.asarray(logits)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """``exp(z) / sum exp(z)`` over the last axis, keeping the input's float dtype.

    Examples
    --------
    >>> import numpy as np
    >>> softmax(np.array([[0.0, np.log(3.0)]]))
    array([[0.25, 0.75]])
    """
    z = np.asarray(logits)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` elementwise, as ``(1 + tanh(x / 2)) / 2``: no overflow.

    The two-class softmax: ``softmax([0, x])[1]``.

    Examples
    --------
    >>> import numpy as np
    >>> sigmoid(np.array([0.0, np.log(3.0), -1000.0]))
    array([0.5 , 0.75, 0.  ])
    """
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def to_probabilities(scores: np.ndarray, kind: Literal["probabilities", "logits"]) -> np.ndarray:
    """Probabilities from probabilities (returned as they are) or logits (softmaxed).

    Examples
    --------
    >>> import numpy as np
    >>> to_probabilities(np.array([[0.0, 0.0]]), "logits")
    array([[0.5, 0.5]])
    """
    return softmax(scores) if kind == "logits" else np.asarray(scores)


def to_log_probabilities(
    scores: np.ndarray, kind: Literal["probabilities", "logits"], *, eps: float = 1e-12
) -> np.ndarray:
    """Log-probabilities from logits (log-softmax) or probabilities (log, clipped at ``eps``).

    Log-probabilities are logits themselves (softmax of them gives the
    probabilities back), so logit-based calibrators accept probabilities
    through this conversion.

    Examples
    --------
    >>> import numpy as np
    >>> to_log_probabilities(np.array([[1.0, 0.0]]), "probabilities", eps=1e-4).round(3)
    array([[ 0.  , -9.21]])
    """
    if kind == "logits":
        return log_softmax(scores)
    return np.log(np.maximum(np.asarray(scores), eps))
