"""What running a student or a teacher needs: thread and mode guards, batched logits
with shape errors as one line, and precomputed logits read as float32."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from modelfuse.distill.teacher import evaluation_mode, forward_in_batches
from modelfuse.errors import DataError

__all__ = [
    "given_logits",
    "guarded",
    "student_logits",
    "student_output",
    "torch_threads",
    "training_mode",
]


@contextmanager
def torch_threads(n_threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n_threads`` (unchanged for None), restored after."""
    if n_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(n_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def training_mode(module: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.train()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def student_logits(student: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad(), evaluation_mode([student]):
        return guarded(
            lambda: forward_in_batches(student, x, batch_size=batch_size, source="student"),
            "student",
            x,
        )


def student_output(student: nn.Module, x: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The student's first output, checked against the teacher's shape."""
    out = guarded(lambda: student(x), "student", x)
    if not isinstance(out, torch.Tensor) or out.shape != teacher.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(
            f"student: returned {shape} for a batch of {x.shape[0]} inputs, the teacher "
            f"{tuple(teacher.shape)}; the student must predict the teacher's "
            f"{teacher.shape[1]} classes"
        )
    return out


def guarded(run: Callable[[], Any], who: str, x: torch.Tensor) -> Any:
    """``run()``, a shape error of a model on the inputs as one DataError."""
    try:
        return run()
    except (RuntimeError, ValueError, IndexError) as exc:
        if isinstance(exc, DataError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = (
            "; integer inputs are passed as int64: save them as floats if the model takes floats"
            if not x.is_floating_point()
            else ""
        )
        raise DataError(
            f"{who}: cannot run on inputs of shape {tuple(x.shape)} ({first[:160]}); "
            f"give inputs the model's architecture takes{hint}"
        ) from None


def given_logits(value: Any, *, source: str) -> torch.Tensor:
    """Precomputed logits as float32 (``-inf`` allowed: log-probabilities of zero)."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise DataError(f"{source}: expected real numbers, got dtype {value.dtype}")
        return value.detach().to(torch.float32)
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise DataError(f"{source}: expected real numbers, got dtype {array.dtype}")
    return torch.from_numpy(np.array(array, dtype=np.float32))
