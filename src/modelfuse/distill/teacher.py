"""Teachers: whatever gives logits for a batch of inputs, run without gradients.

A teacher is one of

- a ``torch.nn.Module`` returning logits (a single network, or a merge);
- a fitted scikit-learn-style model with ``predict_proba`` (e.g. a
  :class:`~modelfuse.ensemble.VotingEnsemble`): it receives the batch as a
  NumPy array and its probabilities are used through their logarithm;
- any other callable ``f(batch) -> logits`` (a tensor or an array);
- a list or tuple of the above: an ensemble whose members' probabilities are
  averaged (or, with ``average="logits"``, their log-probabilities: a
  normalised geometric mean), optionally weighted.

Modules are run in evaluation mode under :func:`torch.no_grad`, and every
submodule's ``training`` flag is put back afterwards. Nothing here changes a
teacher's weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from modelfuse.errors import ConfigError, DataError

__all__ = [
    "check_logits",
    "evaluation_mode",
    "forward_in_batches",
    "teacher_function",
    "teacher_logits",
]

Average = Literal["probabilities", "logits"]


@contextmanager
def evaluation_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Put ``modules`` in evaluation mode and restore every submodule's own flag after.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    >>> net[1].eval()  # doctest: +ELLIPSIS
    Dropout(...)
    >>> with evaluation_mode([net]):
    ...     net.training
    False
    >>> net.training, net[1].training
    (True, False)
    """
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _as_tensor(value: Any, *, source: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        array = np.asarray(value)
    except Exception:  # an object numpy cannot read: say what it was
        array = None
    if array is None or not np.issubdtype(array.dtype, np.number):
        raise DataError(
            f"{source}: returned {type(value).__name__}; expected logits as a tensor or array "
            "of shape (n_samples, n_classes)"
        )
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _member_function(member: Any, *, source: str) -> tuple[Callable[[torch.Tensor], Any], bool]:
    """``(f, gives_probabilities)`` for one teacher or member."""
    if isinstance(member, nn.Module):
        return member, False
    if hasattr(member, "predict_proba"):
        return (lambda x: member.predict_proba(x.detach().cpu().numpy())), True
    if callable(member):
        return member, False
    raise ConfigError(
        f"{source}: {type(member).__name__} is neither an nn.Module, a fitted model with "
        "predict_proba, a callable returning logits nor a list of those"
    )


def teacher_function(
    teacher: Any,
    *,
    average: Average = "probabilities",
    weights: Sequence[float] | np.ndarray | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``batch -> logits`` (float32, no gradient) for any kind of teacher.

    Parameters
    ----------
    teacher : nn.Module, fitted model, callable, or a list of those
        See the module docstring. A list is an ensemble.
    average : {"probabilities", "logits"}, default "probabilities"
        How an ensemble's members are combined: the weighted mean of their
        probabilities (the result's logarithm is returned), or of their
        log-probabilities.
    weights : array of shape (n_members,), optional
        Non-negative ensemble weights, normalised to sum to one (uniform when
        omitted).

    Returns
    -------
    callable
        Log-probabilities or logits for a batch; the teacher's modules are in
        evaluation mode during the call and restored after.

    Raises
    ------
    ConfigError
        An unknown kind of teacher, an empty ensemble, bad weights or ``average``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    >>> f = teacher_function([a, b])
    >>> x = torch.randn(4, 3)
    >>> p = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
    >>> torch.allclose(f(x).exp(), p.detach())
    True
    """
    if average not in ("probabilities", "logits"):
        raise ConfigError(
            f"average: expected 'probabilities' or 'logits', got {str(average)[:40]!r}"
        )
    members = list(teacher) if isinstance(teacher, (list, tuple)) else None
    if members is None:
        if weights is not None:
            raise ConfigError("weights: given for a single teacher; give a list of members")
        function, probabilities = _member_function(teacher, source="teacher")
        modules = [teacher] if isinstance(teacher, nn.Module) else []

        def single(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), evaluation_mode(modules):
                out = _as_tensor(function(x), source="teacher").float()
            return _log(out) if probabilities else out

        return single
    if not members:
        raise ConfigError("teacher: an empty list; give at least one member")
    w = _weights(weights, len(members))
    functions = [_member_function(m, source=f"teacher[{i}]") for i, m in enumerate(members)]
    modules = [m for m in members if isinstance(m, nn.Module)]

    def ensemble(x: torch.Tensor) -> torch.Tensor:
        terms = []
        with torch.no_grad(), evaluation_mode(modules):
            for i, ((function, probabilities), weight) in enumerate(zip(functions, w)):
                out = _as_tensor(function(x), source=f"teacher[{i}]").double()
                log_p = _log(out) if probabilities else torch.log_softmax(out, dim=-1)
                if terms and log_p.shape != terms[0].shape:
                    raise DataError(
                        f"teacher[{i}]: returned shape {tuple(log_p.shape)}, teacher[0] "
                        f"{tuple(terms[0].shape)}; every member must predict the same classes"
                    )
                terms.append(weight * (log_p.exp() if average == "probabilities" else log_p))
        total = torch.stack(terms).sum(dim=0)
        return (_log(total) if average == "probabilities" else total).float()

    return ensemble


def _log(probabilities: torch.Tensor) -> torch.Tensor:
    """``log p``; ``-inf`` where ``p == 0`` (the loss counts those classes as impossible)."""
    return torch.log(probabilities.clamp_min(0.0))


def _weights(weights: Sequence[float] | np.ndarray | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(
            f"weights: expected {n} finite non-negative numbers with a positive sum, got "
            f"{np.array2string(w[:8], precision=3)}"
        )
    return [float(v) for v in w / w.sum()]


def forward_in_batches(
    function: Callable[[torch.Tensor], Any],
    inputs: torch.Tensor,
    *,
    batch_size: int = 256,
    source: str = "teacher",
) -> torch.Tensor:
    """``function`` applied to ``inputs`` in batches, the outputs stacked as float32.

    Raises
    ------
    DataError
        An output that is not ``(batch, n_classes)``, changes its number of
        classes between batches, or holds NaN or ``+inf``.
    """
    outputs = []
    for start in range(0, inputs.shape[0], batch_size):
        batch = inputs[start : start + batch_size]
        out = _as_tensor(function(batch), source=source).float()
        check_logits(out, rows=batch.shape[0], source=source)
        if outputs and out.shape[1] != outputs[0].shape[1]:
            raise DataError(
                f"{source}: returned {out.shape[1]} classes for rows from {start}, "
                f"{outputs[0].shape[1]} before; expected the same number of classes"
            )
        outputs.append(out)
    return torch.cat(outputs)


def check_logits(logits: torch.Tensor, *, rows: int, source: str) -> None:
    """Refuse logits that are not ``(rows, n_classes >= 2)`` or hold NaN, ``+inf`` or a row of ``-inf``."""
    if logits.ndim != 2 or logits.shape[0] != rows or logits.shape[1] < 2:
        raise DataError(
            f"{source}: returned shape {tuple(logits.shape)} for {rows} inputs; expected "
            f"({rows}, n_classes) with at least 2 classes"
        )
    bad = torch.isnan(logits) | (logits == math.inf)
    if bad.any() or bool((logits == -math.inf).all(dim=1).any()):
        raise DataError(
            f"{source}: returned NaN or infinite logits ({int(bad.sum())} values); "
            "check the model and its inputs"
        )


def teacher_logits(
    teacher: Any,
    inputs: torch.Tensor | np.ndarray,
    *,
    batch_size: int = 256,
    average: Average = "probabilities",
    weights: Sequence[float] | np.ndarray | None = None,
) -> torch.Tensor:
    """The teacher's logits (log-probabilities for an ensemble) on every row of ``inputs``.

    Computed once, in batches, without gradients; this is what
    :class:`~modelfuse.distill.Distiller` caches when its data are fixed.

    Parameters
    ----------
    teacher : nn.Module, fitted model, callable, or a list of those
        See :func:`teacher_function`.
    inputs : Tensor or array of shape (n_samples, ...)
    batch_size : int, default 256
    average, weights
        See :func:`teacher_function`.

    Returns
    -------
    Tensor of shape (n_samples, n_classes), float32

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(3, 4)
    >>> teacher_logits(net, torch.zeros(5, 3), batch_size=2).shape
    torch.Size([5, 4])
    """
    x = torch.as_tensor(inputs)
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    function = teacher_function(teacher, average=average, weights=weights)
    return forward_in_batches(function, x, batch_size=int(batch_size), source="teacher")
