"""Inputs and labels for distillation: checked tensors, a seeded split, seeded batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from modelfuse.arrays import check_labels
from modelfuse.errors import ConfigError, DataError

__all__ = [
    "as_inputs",
    "as_labels",
    "read_loader",
    "shuffled_batches",
    "split_batch",
    "split_validation",
]


def as_inputs(value: Any, *, source: str = "X") -> torch.Tensor:
    """``value`` as a tensor of at least one row: float32, or int64 for integer inputs.

    Floating-point inputs become float32 and must be finite; integer inputs
    (token ids for an embedding, say) stay integers, as int64. A tensor
    already of the target dtype is used as it is (never modified); anything
    else is converted into a new tensor.

    Raises
    ------
    DataError
        Not real numbers, empty, zero-dimensional, or holding NaN or inf.

    Examples
    --------
    >>> as_inputs([[1.0, 2.0], [3.0, 4.0]]).dtype, as_inputs([[1, 2], [3, 4]]).dtype
    (torch.float32, torch.int64)
    """
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise DataError(f"{source}: expected real numbers, got dtype {tensor.dtype}")
        tensor = tensor.to(torch.float32 if tensor.is_floating_point() else torch.int64)
    else:
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise DataError(f"{source}: expected real numbers, got dtype {array.dtype}")
        integer = np.issubdtype(array.dtype, np.integer)
        tensor = torch.from_numpy(np.array(array, dtype=np.int64 if integer else np.float32))
    if tensor.ndim == 0 or tensor.shape[0] == 0 or tensor.numel() == 0:
        raise DataError(
            f"{source}: expected inputs of shape (n_samples, ...), got {tuple(tensor.shape)}"
        )
    if tensor.is_floating_point():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            where = tuple(int(i) for i in torch.nonzero(~finite)[0])
            raise DataError(
                f"{source}: {int((~finite).sum())} NaN or inf values, the first at index "
                f"{where}; remove or repair them"
            )
    return tensor


def as_labels(value: Any, *, n_samples: int, n_classes: int, source: str = "y") -> torch.Tensor:
    """Integer labels in ``[0, n_classes)``, one per sample, as an int64 tensor.

    Raises
    ------
    DataError
        See :func:`modelfuse.arrays.check_labels`.

    Examples
    --------
    >>> as_labels([0, 2, 1], n_samples=3, n_classes=3)
    tensor([0, 2, 1])
    """
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
    checked = check_labels(
        np.asarray(array), n_samples=n_samples, n_classes=n_classes, source=source
    )
    return torch.from_numpy(checked)


def read_loader(loader: DataLoader, *, source: str = "X") -> tuple[torch.Tensor, Any]:
    """Every batch of ``loader`` read once: ``(inputs, labels or None)``.

    Batches are ``(inputs, labels)`` pairs or inputs alone.

    Raises
    ------
    DataError
        The loader yields nothing, or some batches have labels and others not.
    """
    inputs, labels = [], []
    for batch in loader:
        x, y = split_batch(batch, source=source)
        inputs.append(torch.as_tensor(x))
        labels.append(None if y is None else torch.as_tensor(y))
    if not inputs:
        raise DataError(f"{source}: the DataLoader yields no batches; expected data")
    with_labels = [y is not None for y in labels]
    if any(with_labels) and not all(with_labels):
        raise DataError(
            f"{source}: some batches carry labels and others do not; give (inputs, labels) "
            "for every batch or inputs alone"
        )
    x_all = torch.cat(inputs)
    y_all = torch.cat(labels) if all(with_labels) else None  # type: ignore[arg-type]
    return x_all, y_all


def split_batch(batch: Any, *, source: str = "X") -> tuple[Any, Any]:
    """``(inputs, labels)`` of one batch; labels ``None`` for a batch of inputs alone."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise DataError(
            f"{source}: a batch of {len(batch)} items; expected (inputs, labels) or inputs"
        )
    return batch, None


def split_validation(
    n_samples: int, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices ``(train, validation)``: a seeded random ``fraction`` held out.

    Examples
    --------
    >>> train, val = split_validation(10, 0.2, torch.Generator().manual_seed(0))
    >>> len(train), len(val), sorted(train.tolist() + val.tolist()) == list(range(10))
    (8, 2, True)
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation_fraction: expected a number in (0, 1), got {fraction!r}")
    n_val = int(round(fraction * n_samples))
    if n_val < 1 or n_val >= n_samples:
        raise DataError(
            f"validation_fraction: {fraction} of {n_samples} samples leaves "
            f"{n_val} for validation and {n_samples - n_val} for training; "
            "each needs at least one sample"
        )
    order = torch.randperm(n_samples, generator=generator)
    return order[n_val:].sort().values, order[:n_val].sort().values


def shuffled_batches(
    n_samples: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Row indices of one epoch's batches, in a seeded random order.

    Examples
    --------
    >>> batches = list(shuffled_batches(5, 2, torch.Generator().manual_seed(0)))
    >>> [len(b) for b in batches], sorted(torch.cat(batches).tolist())
    ([2, 2, 1], [0, 1, 2, 3, 4])
    """
    order = torch.randperm(n_samples, generator=generator)
    for start in range(0, n_samples, batch_size):
        yield order[start : start + batch_size]
