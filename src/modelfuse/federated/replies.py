"""Checking a client's reply against the global model, one tensor at a time.

A reply is refused (with the reason as the return value, never an exception)
when its example count, tensor names, shapes, dtypes or values, or the
statistics the method reads do not fit the global model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from modelfuse.federated.updates import ClientUpdate
from modelfuse.merge.parameters import short

__all__ = [
    "as_tensor",
    "check_statistics",
    "check_update",
    "is_floating",
    "listed_names",
    "shape_of",
]

_LISTED = 5
"""Names listed in a message; the others are counted."""


def as_tensor(value: Any) -> torch.Tensor:
    """A torch view (or the tensor itself) of a tensor, a NumPy array or a Flower ``Array``."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if hasattr(value, "numpy"):
        return torch.from_numpy(np.asarray(value.numpy()))
    return torch.as_tensor(value)


def shape_of(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in value.shape)


def listed_names(names: Sequence[str] | set[str]) -> str:
    ordered = sorted(names)
    listed = ", ".join(short(n) for n in ordered[:_LISTED])
    more = f" and {len(ordered) - _LISTED} more" if len(ordered) > _LISTED else ""
    return listed + more


def is_floating(value: Any) -> bool:
    dtype = value.dtype
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return np.dtype(dtype).kind == "f"


def check_statistics(
    update: ClientUpdate,
    kind: str,
    record: Mapping[str, Any] | None,
    global_arrays: Mapping[str, Any],
) -> str | None:
    if record is None or len(record) == 0:
        return f"sent no {kind} statistics, which the method reads; compute them on the client"
    unknown = [name for name in record if name not in global_arrays]
    if unknown:
        return (
            f"sent {kind} statistics for tensors the global model has not: {listed_names(unknown)}"
        )
    for name, value in record.items():
        target = shape_of(global_arrays[name])
        if kind == "fisher":
            expected = target
        else:
            if len(target) != 2:
                return (
                    f"sent a Gram matrix for tensor {short(name)} of shape {list(target)}; "
                    "Gram matrices belong to 2-D linear weights"
                )
            expected = (target[1], target[1])
        if shape_of(value) != expected:
            return (
                f"{kind} of tensor {short(name)} has shape {list(shape_of(value))}, "
                f"expected {list(expected)}"
            )
        tensor = as_tensor(value)
        if tuple(tensor.shape) != expected:
            return f"{kind} of tensor {short(name)} holds data of another shape than it declares"
        if not tensor.dtype.is_floating_point:
            return f"{kind} of tensor {short(name)} has dtype {tensor.dtype}, expected floats"
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            return f"{kind} of tensor {short(name)} has {bad} NaN or inf values"
        if kind == "fisher" and tensor.numel() and float(tensor.min()) < 0:
            return f"fisher of tensor {short(name)} has negative entries"
    return None


def check_update(
    update: ClientUpdate,
    global_arrays: Mapping[str, Any],
    needs: tuple[str, ...],
) -> str | None:
    """Why this reply cannot be aggregated, or None. Reads one tensor at a time."""
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        return f"reported {short(n)} examples; expected a positive number"
    missing = [name for name in global_arrays if name not in update.arrays]
    if missing:
        return f"misses tensors of the global model: {listed_names(missing)}"
    extra = [name for name in update.arrays if name not in global_arrays]
    if extra:
        return f"sent tensors the global model has not: {listed_names(extra)}"
    for name, value in update.arrays.items():
        expected = shape_of(global_arrays[name])
        if shape_of(value) != expected:
            return (
                f"tensor {short(name)} has shape {list(shape_of(value))}, "
                f"the global model's has {list(expected)}"
            )
        tensor = as_tensor(value)
        if tuple(tensor.shape) != expected:
            return f"tensor {short(name)} holds data of another shape than it declares"
        if is_floating(global_arrays[name]) and not tensor.dtype.is_floating_point:
            return f"tensor {short(name)} has dtype {tensor.dtype}, expected floats"
        if tensor.dtype.is_floating_point:
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                return f"tensor {short(name)} has {bad} NaN or inf values of {tensor.numel()}"
    if "variance" in needs:
        v = update.variance
        if v is None:
            return "reported no update variance, which the method reads; compute it on the client"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            return f"reported an update variance of {short(v)}; expected a positive number"
    for kind in ("fisher", "gram"):
        if kind in needs:
            record = update.fisher if kind == "fisher" else update.gram
            reason = check_statistics(update, kind, record, global_arrays)
            if reason is not None:
                return reason
    return None
