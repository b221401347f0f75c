"""Feeding data to a model: batches of ``(inputs, labels)`` or of inputs alone.

A batch's *inputs* are a tensor (passed as ``model(inputs)``) or a mapping of
tensors (passed as ``model(**inputs)``, as Hugging Face models take
``input_ids`` and ``attention_mask``); the first dimension of every tensor is
the example. A batch given as a 2-tuple or 2-list is ``(inputs, labels)`` with
``labels`` an integer tensor of shape ``(batch,)``; anything else is inputs
without labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelfuse.errors import DataError

__all__ = [
    "Batch",
    "Inputs",
    "ProgressCallback",
    "call_model",
    "count_examples",
    "evaluation_mode",
    "extract_logits",
    "iterate_batches",
    "model_device",
]

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
"""A batch's inputs: a tensor, or keyword tensors for the model's forward."""

ProgressCallback = Callable[[int], None]
"""Called after each batch with the number of examples processed so far."""


@dataclass(frozen=True)
class Batch:
    """One batch, already cut to the examples still needed and moved to the model's device."""

    inputs: Inputs
    labels: torch.Tensor | None
    size: int


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU when it has neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _batch_size(inputs: Inputs, index: int) -> int:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise DataError(
                f"batch {index}: inputs are a 0-d tensor; expected a tensor whose first "
                "dimension is the example"
            )
        return int(inputs.shape[0])
    sizes = set()
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise DataError(
                f"batch {index}: input {key!r} is a {type(value).__name__}"
                f"{'' if not isinstance(value, torch.Tensor) else ' without dimensions'}; "
                "expected a tensor whose first dimension is the example"
            )
        sizes.add(int(value.shape[0]))
    if len(sizes) != 1:
        raise DataError(
            f"batch {index}: the input tensors have different first dimensions {sorted(sizes)}; "
            "every input needs one row per example"
        )
    return sizes.pop()


def _cut(inputs: Inputs, n: int, device: torch.device) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return inputs[:n].to(device)
    return {key: value[:n].to(device) for key, value in inputs.items()}


def iterate_batches(
    batches: Iterable[Any],
    n_examples: int,
    *,
    device: torch.device,
    need_labels: bool,
    where: str = "batches",
) -> Iterator[Batch]:
    """Yield batches until ``n_examples`` examples are reached, cutting the last one.

    Raises
    ------
    DataError
        A batch is not inputs or ``(inputs, labels)``, labels are missing when
        needed, or they have the wrong shape or type.
    """
    if n_examples < 1:
        raise DataError(f"n_examples: expected a positive number of examples, got {n_examples}")
    seen = 0
    for index, item in enumerate(batches):
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise DataError(
                    f"{where}: batch {index} is a sequence of {len(item)} items; expected "
                    "inputs, or a pair (inputs, labels)"
                )
            inputs, labels = item
        else:
            inputs, labels = item, None
        if not isinstance(inputs, (torch.Tensor, Mapping)):
            raise DataError(
                f"{where}: batch {index} has inputs of type {type(inputs).__name__}; expected a "
                "tensor or a mapping of tensors (keyword arguments of the model)"
            )
        size = _batch_size(inputs, index)
        if labels is None and need_labels:
            raise DataError(
                f"{where}: batch {index} has no labels, but the empirical Fisher needs them; "
                "give (inputs, labels) pairs or use kind='exact'"
            )
        if labels is not None:
            if not isinstance(labels, torch.Tensor):
                labels = torch.as_tensor(labels)
            if labels.dim() != 1 or int(labels.shape[0]) != size:
                raise DataError(
                    f"{where}: batch {index} has labels of shape {list(labels.shape)} for "
                    f"{size} examples; expected shape [{size}]"
                )
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise DataError(
                    f"{where}: batch {index} has labels of dtype {labels.dtype}; expected "
                    "integer class indices"
                )
        take = min(size, n_examples - seen)
        if take <= 0:
            break
        cut_labels = None if labels is None else labels[:take].to(device=device, dtype=torch.long)
        yield Batch(_cut(inputs, take, device), cut_labels, take)
        seen += take
        if seen >= n_examples:
            break
    if seen == 0:
        raise DataError(f"{where}: no examples; give at least one non-empty batch")


def count_examples(batches: Iterable[Any]) -> int | None:
    """The number of examples in a list or tuple of batches; None for other iterables.

    Examples
    --------
    >>> count_examples([torch.zeros(3, 2), (torch.zeros(4, 2), torch.zeros(4))])
    7
    >>> count_examples(iter([torch.zeros(3, 2)])) is None
    True
    """
    if not isinstance(batches, (list, tuple)):
        return None
    total = 0
    for index, item in enumerate(batches):
        inputs = item[0] if isinstance(item, (tuple, list)) and len(item) == 2 else item
        if not isinstance(inputs, (torch.Tensor, Mapping)):
            return None
        total += _batch_size(inputs, index)
    return total


def extract_logits(output: Any, *, where: str = "model output") -> torch.Tensor:
    """The ``(batch, classes)`` logits of a model output: a tensor, ``.logits`` or ``[0]``."""
    if isinstance(output, torch.Tensor):
        logits = output
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    else:
        raise DataError(
            f"{where}: the model returned a {type(output).__name__}; expected logits as a "
            "tensor, an object with .logits, or a tuple whose first item is the logits"
        )
    if logits.dim() != 2:
        raise DataError(
            f"{where}: logits of shape {list(logits.shape)}; expected (batch, classes) "
            "from a classifier"
        )
    return logits


def call_model(model: Callable[..., Any], inputs: Inputs) -> Any:
    """``model(inputs)`` for a tensor, ``model(**inputs)`` for a mapping."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    return model(**inputs)


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in evaluation mode; restore each one's own flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
