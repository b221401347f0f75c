"""Running a plan: read, merge and hand over each tensor, in a small thread pool.

Shared by the streaming file merge (:mod:`modelfuse.merge.engine`) and the
in-memory merge (:mod:`modelfuse.merge.state_dict`): they differ only in where
the inputs come from and where the results go.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Literal

import torch

from modelfuse.errors import ConfigError, DataError, ModelfuseError
from modelfuse.merge.plan import MergePlan, TensorTask
from modelfuse.merge.schedule import EXCLUSIVE_BYTES, Piece, Rows, Schedule, working_bytes

__all__ = [
    "NonFiniteInputWarning",
    "default_threads",
    "execute_plan",
    "prepare_stream",
    "tensor_generator",
]


class NonFiniteInputWarning(UserWarning):
    """An input tensor holds NaN or inf values."""


def tensor_generator(seed: int | None, name: str) -> torch.Generator:
    """A generator seeded from ``seed`` and the tensor's name.

    The stream of random numbers for a tensor depends only on the seed and the
    name, never on the order in which tensors are merged or on the thread.
    """
    base = 0 if seed is None else int(seed)
    mixed = (base * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def _read(
    plan: MergePlan, task: TensorTask, rows: Rows = None, *, check: bool = True
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The task's inputs, rounded to the compute dtype if one is set.

    They are float32 unless the method declares ``low_precision_inputs`` (it
    converts chunk by chunk itself, so a bfloat16 tensor is not held twice).
    When the inputs' first dimensions differ, only the shared rows are returned.
    With ``rows``, only that block of rows is read. ``check`` warns about NaN
    and inf values (a reduction's read does not: the merge reads them again).
    """
    compute = plan.compute_dtype
    widen = not plan.method.low_precision_inputs
    warned = []

    def load(model: Any, input_name: str) -> torch.Tensor:
        if rows is None:
            tensor = model.source.read(input_name)
        else:
            tensor = model.source.read_rows(input_name, *rows)
        if task.shared_rows is not None:
            tensor = tensor[: task.shared_rows]
        if tensor.is_floating_point() and tensor.dtype.itemsize == 1:
            tensor = tensor.to(torch.float32)  # float8: computed in float32 by every method
        if compute is not None and tensor.dtype != compute:
            tensor = tensor.to(compute)
        if widen:
            tensor = tensor.to(torch.float32)
        if check and _has_nonfinite(tensor):
            warned.append(model.label)
        return tensor

    tensors = [load(m, n) for m, n in zip(task.models, task.inputs)]
    base = None
    if task.base is not None and task.base_input is not None:
        base = load(task.base, task.base_input)
    for label in warned:
        warnings.warn(
            f"{label}: tensor {task.name} holds NaN or inf values; the merged tensor may too",
            NonFiniteInputWarning,
            stacklevel=2,
        )
    return tensors, base


def _statistics(
    plan: MergePlan, task: TensorTask, rows: Rows = None
) -> dict[str, list[torch.Tensor | None]]:
    """Each model's statistics tensor of the task's name (or rows of it), None where absent.

    When the base model has statistics (``base_statistics``), ``base_KIND`` holds its
    tensor as a one-entry list.
    """

    def read(source: Any, name: str, kind: str) -> torch.Tensor | None:
        if source is None or name not in source:
            return None
        shape = tuple(source.info(name).shape)
        if kind == "fisher" and shape != tuple(task.shape) and task.shared_rows is None:
            raise ConfigError(
                f"{_where(source)}: statistics tensor {name} has shape "
                f"{list(shape)}, expected {list(task.shape)} (the model's); "
                "were the statistics computed for another model?"
            )
        tensor = source.read(name) if rows is None else source.read_rows(name, *rows)
        if _has_nonfinite(tensor):
            raise DataError(
                f"{_where(source)}: statistics tensor {name} holds NaN or inf values; expected "
                "finite statistics; compute them again with `modelfuse statistics`"
            )
        return tensor

    found: dict[str, list[torch.Tensor | None]] = {
        kind: [read(m.statistics, n, kind) for m, n in zip(task.models, task.inputs)]
        for kind in plan.method.statistics
    }
    base = task.base
    if (
        plan.method.base_statistics
        and base is not None
        and base.statistics is not None
        and task.base_input is not None
    ):
        for kind in plan.method.statistics:
            if any(entry is not None for entry in found[kind]):
                if task.base_input not in base.statistics:
                    raise DataError(
                        f"{_where(base.statistics)}: the base model's statistics have no tensor "
                        f"{task.base_input}, which the models' statistics have; compute them "
                        "with `modelfuse statistics` on the base model itself"
                    )
                tensor = read(base.statistics, task.base_input, kind)
                if kind == "fisher" and tensor is not None and tensor.numel():
                    low = float(tensor.min())
                    if low < 0:
                        raise ConfigError(
                            f"{_where(base.statistics)}: statistics tensor {task.base_input} "
                            f"holds negative entries (minimum {low:g}); a Fisher diagonal is a "
                            "mean of squares: compute it again with `modelfuse statistics fisher`"
                        )
                found[f"base_{kind}"] = [tensor]
    return found


def _where(source: Any) -> str:
    """A statistics source for messages: its file, or the label of an in-memory one."""
    return str(getattr(source, "path", None) or getattr(source, "label", "statistics"))


def _extra_rows(plan: MergePlan, task: TensorTask) -> torch.Tensor:
    """Rows past the shared ones, from the model that has them (or the base)."""
    if task.extra_from is None or task.shared_rows is None:
        raise RuntimeError(f"tensor {task.name}: the plan set shared rows without their owner")
    if task.extra_from < 0 and task.base is not None and task.base_input is not None:
        owner, input_name = task.base, task.base_input
    else:
        owner, input_name = task.models[task.extra_from], task.inputs[task.extra_from]
    rows = owner.source.read(input_name)[task.shared_rows :]
    if plan.compute_dtype is not None:
        rows = rows.to(plan.compute_dtype)
    return rows.to(torch.float32)


def _offset(task: TensorTask, rows: Rows) -> int:
    """The flat index of the first entry of a block of rows in the whole tensor."""
    if rows is None:
        return 0
    per_row = 1
    for size in task.shape[1:]:
        per_row *= size
    return rows[0] * per_row


def _reduce(plan: MergePlan, task: TensorTask, rows: Rows) -> Any:
    """The method's reduction on a block of rows (or the whole tensor)."""
    reduction = plan.method.reduction
    if reduction is None:
        raise RuntimeError(f"merge method {plan.method.name!r} declares no reduction")
    tensors, base = _read(plan, task, rows, check=False)
    kwargs = {k: v for k, v in task.parameters.items() if k in reduction.accepts}
    if "name" in reduction.accepts:
        kwargs["name"] = task.name
    if "offset" in reduction.accepts:
        kwargs["offset"] = _offset(task, rows)
    try:
        return reduction.function(tensors, base, **kwargs)
    except ModelfuseError as exc:
        raise type(exc)(f"tensor {task.name}: {exc}") from None


def _call(
    plan: MergePlan,
    task: TensorTask,
    extra: dict[str, Any],
    rows: Rows = None,
    reduced: dict[str, Any] | None = None,
) -> torch.Tensor:
    if task.action == "copy":  # non-float tensors (ids, masks): the first input's, as they are
        return task.models[0].source.read(task.inputs[0]).clone()
    tensors, base = _read(plan, task, rows)
    method = plan.method
    kwargs = dict(task.parameters)
    kwargs.update({k: v for k, v in extra.items() if k in method.accepts})
    if reduced:
        kwargs.update(reduced)
    if "name" in method.accepts:
        kwargs["name"] = task.name
    if "offset" in method.accepts:
        kwargs["offset"] = _offset(task, rows)
    if "generator" in method.accepts:
        kwargs["generator"] = tensor_generator(task.parameters.get("random_seed"), task.name)
    if "statistics" in method.accepts:
        kwargs["statistics"] = _statistics(plan, task, rows)
    try:
        result = method.function(tensors, base, **kwargs)
    except ModelfuseError as exc:
        raise type(exc)(f"tensor {task.name}: {exc}") from None
    result = result.to(torch.float32)
    if task.shared_rows is not None:
        result = torch.cat([result, _extra_rows(plan, task)])
    for patch, scale in task.patches:
        delta = patch.read(task.name) if rows is None else patch.read_rows(task.name, *rows)
        result = result + scale * delta.to(torch.float32)
    if task.out_dtype.itemsize == 1 and task.out_dtype.is_floating_point:
        info = torch.finfo(task.out_dtype)  # float8 has no inf (e4m3fn): saturate, as usual
        result = result.clamp(info.min, info.max)
    result = result.to(task.out_dtype)
    expected = task.shape if rows is None else (rows[1] - rows[0], *task.shape[1:])
    if tuple(result.shape) != expected:
        raise RuntimeError(
            f"merge method {method.name!r} returned shape {list(result.shape)} for tensor "
            f"{task.name}, expected {list(expected)}"
        )
    return result.contiguous()


def _has_nonfinite(tensor: torch.Tensor) -> bool:
    """Whether any entry is NaN or inf.

    One vectorised min/max reduction (NaN propagates, inf is an extreme): on
    bfloat16 about 20x faster than ``isfinite(...).all()``, which builds a mask.
    """
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return False
    if tensor.dtype.itemsize == 1:  # float8: no min/max kernels
        tensor = tensor.to(torch.float32)
    low, high = torch.aminmax(tensor)
    return not (bool(torch.isfinite(low)) and bool(torch.isfinite(high)))


def _release_free_memory() -> None:
    """Hand memory that the allocator keeps after freeing back to the system (glibc only).

    glibc keeps freed blocks of a few MB in its heaps for reuse; after many
    medium tensors that can be hundreds of MB, which would then add to the
    peak of the next very large tensor. Other platforms: nothing to do.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def prepare_stream(plan: MergePlan) -> Callable[..., Iterator[tuple[Any, ...]]]:
    """A re-iterable stream over the merged tensors, for a method's ``prepare`` pass.

    ``stream(select)`` yields ``(name, tensors, base, parameters)``;
    ``select(name, parameters) -> bool`` picks tensors before they are read.
    ``stream(select, what="statistics")`` yields ``(name, statistics,
    parameters)`` instead and reads no model tensor (e.g. for whole-model
    Fisher norms).
    """

    def stream(
        select: Callable[[str, Any], bool] | None = None,
        what: Literal["tensors", "statistics"] = "tensors",
    ) -> Iterator[tuple[Any, ...]]:
        for task in plan.tasks:
            if task.action != "merge":
                continue
            if select is not None and not select(task.name, task.parameters):
                continue
            if what == "statistics":
                yield task.name, _statistics(plan, task), task.parameters
            else:
                tensors, base = _read(plan, task)
                yield task.name, tensors, base, task.parameters

    return stream


def execute_plan(
    plan: MergePlan,
    sink: Callable[[TensorTask, torch.Tensor, int | None], None],
    *,
    threads: int = 1,
    on_done: Callable[[TensorTask, int], None] | None = None,
) -> None:
    """Merge every tensor of ``plan`` and pass each result to ``sink`` as soon as it is ready.

    ``sink(task, tensor, start)`` receives the whole tensor (``start`` None) or
    a block of its rows starting at row ``start`` (see :func:`row_blocks`); it
    may be called from worker threads. ``on_done(task, nbytes)`` is called
    from this thread as each piece finishes. At most ``threads + 1`` pieces are
    in flight, so memory is bounded by a few tensors (or blocks), whatever the
    model size. A tensor of a method with a :class:`~modelfuse.merge.registry.Reduction`
    is reduced first (its blocks in parallel), then its blocks are merged. The
    first error stops the work and is raised.
    """
    extra: dict[str, Any] = {}
    if plan.method.prepare is not None:
        extra = plan.method.prepare(prepare_stream(plan))
    reduction = plan.method.reduction
    schedule = Schedule(plan)
    reducing = schedule.reducing
    reduced: dict[str, dict[str, Any]] = {}

    def work(piece: Piece) -> tuple[Piece, Any]:
        kind, task, rows, _ = piece
        if kind == "reduce":
            return piece, _reduce(plan, task, rows)
        result = _call(plan, task, extra, rows, reduced.get(task.name))
        sink(task, result, None if rows is None else rows[0])
        return piece, result.numel() * result.element_size()

    def finished(done: tuple[Piece, Any]) -> None:
        (kind, task, rows, part), value = done
        if kind == "merge":
            state = reducing.get(task.name)
            if state is not None:
                state.left -= 1
                if state.left == 0:  # every block merged: the reduced value is not needed
                    reduced.pop(task.name, None)
            if on_done is not None:
                on_done(task, value)
            return
        state = reducing[task.name]
        state.values[part] = value
        state.left -= 1
        if state.left == 0 and reduction is not None:
            reduced[task.name] = {reduction.keyword: state.combined(reduction.over)}
            state.values = []
            state.left = len(state.blocks)
            schedule.reduced(task)

    def exclusive(piece: Piece) -> bool:
        return working_bytes(plan, piece[1], piece[2], piece[0]) > EXCLUSIVE_BYTES

    if threads <= 1:
        while (piece := schedule.next()) is not None:
            alone = exclusive(piece)
            if alone:
                _release_free_memory()
            finished(work(piece))
            if alone:
                _release_free_memory()
        return

    pending: set[Future[tuple[Piece, Any]]] = set()
    limit = threads + 1

    def drain(until: int) -> None:
        nonlocal pending
        while len(pending) > until:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                finished(future.result())

    # Tensors are merged ``threads`` at a time; each torch operation then gets its share of
    # the cores, so that torch's own threads do not oversubscribe them (restored after).
    cores = torch.get_num_threads()
    shared = max(1, cores // threads)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="modelfuse") as pool:
        try:
            torch.set_num_threads(shared)
            while schedule or pending:
                piece = schedule.next()
                if piece is None:
                    drain(len(pending) - 1)  # a reduction may finish and add pieces
                    continue
                if exclusive(piece):
                    # A very large tensor is merged with nothing else in flight, in this
                    # thread (a worker's separate malloc arena would keep more memory),
                    # with every core.
                    drain(0)
                    _release_free_memory()
                    torch.set_num_threads(cores)
                    finished(work(piece))
                    torch.set_num_threads(shared)
                    _release_free_memory()
                    continue
                pending.add(pool.submit(work, piece))
                drain(limit - 1)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            torch.set_num_threads(cores)


def default_threads() -> int:
    """All cores available to this process, as ``--threads`` defaults to."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
