"""Scores: held-out measures of a state dict that the searches maximise.

A *score* is any callable ``score(state_dict) -> float`` where higher is
better. It is called with a mapping name -> Tensor holding every entry of the
model's ``state_dict()`` and must not modify it. The factories here build
scores for a classifier ``model`` on fixed ``batches`` of ``(inputs, labels)``:
each call runs the model in eval mode under ``torch.no_grad()`` with the given
weights substituted through :func:`torch.func.functional_call`, so the
module's own weights are never touched, and its training flag is restored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from modelfuse.errors import DataError
from modelfuse.search._state import check_model_keys

__all__ = ["Score", "accuracy_score", "model_outputs", "nll_score"]

Score = Callable[[Mapping[str, torch.Tensor]], float]
"""``score(state_dict) -> float``, higher is better."""


def _labelled_batches(
    batches: Iterable[Any], where: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise DataError(
                f"{where}: batch {i} is a {type(batch).__name__}; expected a pair "
                "(inputs, labels) of tensors"
            )
        x, y = batch
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise DataError(f"{where}: batch {i} must hold two tensors (inputs, labels)")
        if y.dtype.is_floating_point or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(
                f"{where}: batch {i}: labels must be integer class indices of shape "
                f"({x.shape[0]},), got dtype {y.dtype} and shape {tuple(y.shape)}"
            )
        out.append((x, y))
    if not out:
        raise DataError(f"{where}: no batches given; pass a non-empty list of (inputs, labels)")
    return out


def model_outputs(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], inputs: torch.Tensor
) -> torch.Tensor:
    """Outputs of ``model`` with the weights ``state_dict``, in eval mode, without gradients.

    The module keeps its own weights and its training flag.

    Examples
    --------
    >>> m = torch.nn.Linear(2, 1)
    >>> sd = {"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([0.5])}
    >>> model_outputs(m, sd, torch.tensor([[1.0, 1.0]]))
    tensor([[3.5000]])
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return functional_call(model, dict(state_dict), (inputs,))
    finally:
        model.train(was_training)


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The number of samples whose arg-max logit is the label."""
    return (logits.argmax(dim=-1) == labels).sum()


def _log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed log-likelihood of the labels (minus the summed cross-entropy)."""
    return -torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a compact copy when it is a view into a larger storage."""
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


class _ModelScore:
    """``score(state_dict)``: a per-batch sum over fixed batches, divided by the sample count.

    A module-level class rather than a closure, so that scores can be pickled
    and sent to the worker processes of :class:`modelfuse.executors.LocalExecutor`.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        name: str,
        per_batch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        self.model = model
        self.data = _labelled_batches(batches, name)
        self.total = sum(int(y.shape[0]) for _, y in self.data)
        self.__name__ = name
        self.per_batch = per_batch

    def __repr__(self) -> str:
        return f"{self.__name__}({type(self.model).__name__}, {self.total} samples)"

    def __getstate__(self) -> dict[str, Any]:
        # A batch that is a slice of a larger tensor would pickle that whole tensor
        # (torch pickles storages): send each batch's own elements only.
        state = dict(self.__dict__)
        state["data"] = [(_own(x), _own(y)) for x, y in self.data]
        return state

    def __call__(self, state_dict: Mapping[str, torch.Tensor]) -> float:
        check_model_keys(self.model, state_dict, self.__name__)
        value = 0.0
        for x, y in self.data:
            logits = model_outputs(self.model, state_dict, x)
            value += float(self.per_batch(logits, y))
        return value / self.total


def accuracy_score(model: nn.Module, batches: Iterable[Any]) -> Score:
    """A score: the top-1 accuracy of the classifier ``model`` on ``batches``.

    Parameters
    ----------
    model : nn.Module
        Maps a batch of inputs to logits of shape (n, n_classes). Only its
        architecture is used; each call substitutes the weights it is given.
    batches : iterable of (Tensor, Tensor)
        ``(inputs, labels)`` pairs, labels integer class indices; read once,
        when the score is built.

    Returns
    -------
    callable
        ``score(state_dict) -> float``, the fraction of samples (over all
        batches) whose arg-max logit is the label. It can be pickled, so it
        runs on :class:`~modelfuse.executors.LocalExecutor` worker processes.

    Examples
    --------
    >>> _ = torch.manual_seed(0); m = torch.nn.Linear(3, 2)
    >>> x = torch.randn(8, 3); y = m(x).argmax(1).detach()
    >>> accuracy_score(m, [(x, y)])(m.state_dict())
    1.0
    """
    return _ModelScore(model, batches, "accuracy_score", _correct)


def nll_score(model: nn.Module, batches: Iterable[Any]) -> Score:
    """A score: minus the mean negative log-likelihood of the classifier ``model``.

    Parameters
    ----------
    model : nn.Module
        Maps a batch of inputs to logits of shape (n, n_classes).
    batches : iterable of (Tensor, Tensor)
        ``(inputs, labels)`` pairs, read once when the score is built.

    Returns
    -------
    callable
        ``score(state_dict) -> float`` equal to
        :math:`\\frac{1}{n}\\sum_i \\log \\mathrm{softmax}(z_i)_{y_i}` over every
        sample of every batch (the negated NLL, so that higher is better).
        It can be pickled, like :func:`accuracy_score`.

    Examples
    --------
    >>> m = torch.nn.Linear(1, 2)
    >>> sd = {"weight": torch.zeros(2, 1), "bias": torch.zeros(2)}
    >>> round(nll_score(m, [(torch.ones(4, 1), torch.tensor([0, 1, 0, 1]))])(sd), 4)
    -0.6931
    """
    return _ModelScore(model, batches, "nll_score", _log_likelihood)
