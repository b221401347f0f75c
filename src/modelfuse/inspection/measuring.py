"""Reading and measuring an inspection's tensors: one tensor of every input at a time, large
ones in blocks of rows, in a small thread pool."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import torch

from modelfuse.inspection.figures import (
    READ_BLOCK,
    TaskVectorFigures,
    streamed_figures,
    tensor_figures,
)
from modelfuse.inspection.planning import TensorJob
from modelfuse.merge.plan import MergePlan

__all__ = ["base_reader", "measure_all", "model_state"]


def _nonfinite(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0:
        return False
    if tensor.dtype.itemsize == 1:
        tensor = tensor.to(torch.float32)
    low, high = torch.aminmax(tensor)
    return not (math.isfinite(float(low)) and math.isfinite(float(high)))


def base_reader(job: TensorJob) -> Callable[[], torch.Tensor]:
    return lambda: job.base_source.read(job.base_name)


def _measure(job: TensorJob) -> tuple[TaskVectorFigures | None, list[str], int]:
    """The figures of one tensor, or None and the inputs holding NaN or inf.

    A tensor sampled for the sign figures is read in blocks of rows, one pass,
    never whole; any other is read whole, one tensor of each input at a time.
    """
    task = job.task
    shape = task.shape
    rows = task.shared_rows if task.shared_rows is not None else (shape[0] if shape else 0)
    numel = math.prod(shape[1:]) * rows if shape else 1
    settings = {
        "weight": job.weight,
        "overlap_density": job.overlap,
        "conflict_density": job.conflict,
        "consensus_method": job.consensus,
    }
    if job.sample is not None and numel > job.sample and len(shape) >= 1 and rows > 1:
        figures = streamed_figures(
            _row_blocks(job, rows, numel // rows),
            numel,
            len(task.models),
            sample=job.sample,
            **settings,  # type: ignore[arg-type]
        )
        if np.isfinite(np.diag(figures.dots)).all():
            return figures, [], job.nbytes
        tensors, base = _whole(job)  # rare: read whole to name the input holding NaN or inf
    else:
        tensors, base = _whole(job)
        figures = tensor_figures(
            tensors,
            base,
            sample=job.sample,
            **settings,  # type: ignore[arg-type]
        )
        if np.isfinite(np.diag(figures.dots)).all():
            return figures, [], job.nbytes
    bad = [m.label for m, t in zip(task.models, tensors) if _nonfinite(t)]
    if _nonfinite(base):
        bad.insert(0, "the base")
    if not bad:  # finite inputs whose differences overflow float32 when squared
        bad = ["the task vectors (too large to square in float32)"]
    return None, bad, job.nbytes


def _whole(job: TensorJob) -> tuple[list[torch.Tensor], torch.Tensor]:
    task = job.task
    tensors = [m.source.read(name) for m, name in zip(task.models, task.inputs)]
    base = job.base_source.read(job.base_name)
    if task.shared_rows is not None:
        tensors = [t[: task.shared_rows] for t in tensors]
        base = base[: task.shared_rows]
    return tensors, base


def _row_blocks(
    job: TensorJob, rows: int, row_size: int
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """The task's inputs in blocks of rows of about :data:`READ_BLOCK` entries, in order."""
    task = job.task
    step = max(1, READ_BLOCK // max(row_size, 1))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        models = [
            m.source.read_rows(name, start, stop) for m, name in zip(task.models, task.inputs)
        ]
        yield models, job.base_source.read_rows(job.base_name, start, stop)


def measure_all(
    jobs: list[TensorJob],
    threads: int,
    progress: Callable[[int, int], None] | None,
) -> list[tuple[TaskVectorFigures | None, list[str], int]]:
    results: list[Any] = [None] * len(jobs)

    def finish(index: int, value: Any) -> None:
        results[index] = value
        if progress is not None:
            progress(1, value[2])

    # One torch thread per tensor: the work is many operations on chunks of a few MB, which
    # torch's own threads slow down (their start and join cost more than they save).
    cores = torch.get_num_threads()
    if threads <= 1:
        try:
            torch.set_num_threads(1)
            for index, job in enumerate(jobs):
                finish(index, _measure(job))
        finally:
            torch.set_num_threads(cores)
        return results
    # The largest tensors first, so that no thread is left with a large one at the end while
    # the others wait (each result keeps its job's place: the sums are added in job order).
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].nbytes)
    pending: dict[Future[Any], int] = {}
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="modelfuse-inspect") as pool:
        try:
            torch.set_num_threads(1)
            for index in order:
                job = jobs[index]
                pending[pool.submit(_measure, job)] = index
                while len(pending) >= threads:  # at most `threads` tensors in memory
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        finish(pending.pop(future), future.result())
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    finish(pending.pop(future), future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            torch.set_num_threads(cores)
    return results


def model_state(
    plan: MergePlan, which: int, base_read: Mapping[str, Callable[[], torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Every float tensor of model ``which`` (-1: the base), read whole (for a barrier)."""
    state = {}
    for task in plan.tasks:
        if task.action != "merge":
            continue
        if which < 0:
            tensor = base_read[task.name]()
        else:
            tensor = task.models[which].source.read(task.inputs[which])
        state[task.name] = tensor if task.shared_rows is None else tensor[: task.shared_rows]
    return state
