"""How a plan's tensors are cut into pieces and in which order the pieces run.

Large tensors of separable methods are merged in blocks of rows
(:func:`row_blocks`); a method with a per-tensor reduction gets it computed
first, one tensor at a time, ahead of the merges (:class:`Schedule`).
"""

from __future__ import annotations

import collections
from typing import Any

from modelfuse.merge.plan import MergePlan, TensorTask

__all__ = [
    "BLOCK_ELEMENTS",
    "EXCLUSIVE_BYTES",
    "Piece",
    "Reducing",
    "Rows",
    "Schedule",
    "row_blocks",
    "working_bytes",
]


Rows = tuple[int, int] | None
"""A block of rows ``(start, stop)`` of a tensor, or None for the whole tensor."""


BLOCK_ELEMENTS = 4 * 1024 * 1024
"""Separable methods process tensors larger than this in blocks of about this many elements."""


EXCLUSIVE_BYTES = 256 * 1024 * 1024
"""A piece whose working memory exceeds this is merged alone, so two never add up."""


def working_bytes(plan: MergePlan, task: TensorTask, rows: Rows, kind: str = "merge") -> int:
    """Rough memory a piece needs: its inputs as handed over and, for a merge, a float32
    result and the output (a reduction's values are a few numbers per model, or a bit per
    entry, and it works chunk by chunk)."""
    numel = 1
    for size in task.shape:
        numel *= size
    if rows is not None and task.shape:
        numel = numel // task.shape[0] * (rows[1] - rows[0])
    inputs = len(task.models) + (1 if task.base is not None else 0)
    width = 2 if plan.method.low_precision_inputs else 4
    if kind == "reduce":
        return numel * inputs * width
    return numel * (inputs * width + 4 + task.out_dtype.itemsize)


def row_blocks(plan: MergePlan, task: TensorTask, block: int | None = None) -> list[Rows]:
    """How a task is split: blocks of rows for large tensors of separable methods.

    A method is separable when each output row depends only on the same rows
    of the inputs (elementwise methods, for one). Splitting bounds memory by
    the block instead of the largest tensor; the split depends only on the
    tensor's shape, never on the number of threads.
    """
    if (
        task.action != "merge"
        or not plan.method.is_separable(task.parameters)
        or task.shared_rows is not None
        or len(task.shape) == 0
    ):
        return [None]
    block = BLOCK_ELEMENTS if block is None else block
    numel = 1
    for size in task.shape:
        numel *= size
    if numel <= block or task.shape[0] <= 1:
        return [None]
    per_row = numel // task.shape[0]
    step = max(1, block // max(per_row, 1))
    return [(a, min(a + step, task.shape[0])) for a in range(0, task.shape[0], step)]


class Reducing:
    """A tensor whose reduction is under way: the blocks' values, then its merge pieces."""

    __slots__ = ("blocks", "left", "values")

    def __init__(self, parts: int, blocks: list[Rows]) -> None:
        self.values: list[Any] = [None] * parts
        self.left = parts
        self.blocks = blocks

    def combined(self, over: str) -> Any:
        if over == "tensor":
            return self.values[0]
        total = self.values[0]
        for value in self.values[1:]:  # in row order, so the sum never depends on threads
            total = total + value
        return total


Piece = tuple[str, TensorTask, Rows, int]
"""``(kind, task, rows, part)``: merge a block, or compute part ``part`` of a reduction."""


class Schedule:
    """What to start next: one tensor's reduction at a time, ahead of the merges.

    Reductions run as early as possible (each tensor's blocks are merged as
    soon as its reduction is done, so none of the last tensors waits for its
    own at the end), but never two at once: a reduction may read a whole tensor.
    """

    def __init__(self, plan: MergePlan) -> None:
        self.merges: collections.deque[Piece] = collections.deque()
        self.jobs: collections.deque[list[Piece]] = collections.deque()
        self.reducing: dict[str, Reducing] = {}
        self.current: collections.deque[Piece] = collections.deque()
        self.active = False
        method = plan.method
        reduction = method.reduction
        for task in plan.tasks:
            blocks = row_blocks(plan, task)
            if len(blocks) > 1 and reduction is not None and method.needs_reduction(task.parameters):
                parts: list[Rows] = list(blocks) if reduction.over == "rows" else [None]
                self.reducing[task.name] = Reducing(len(parts), blocks)
                self.jobs.append([("reduce", task, rows, i) for i, rows in enumerate(parts)])
            else:
                self.merges.extend(("merge", task, rows, 0) for rows in blocks)

    def next(self) -> Piece | None:
        """The next piece to start, or None while nothing can start."""
        if not self.active and not self.current and self.jobs:
            self.current.extend(self.jobs.popleft())
            self.active = True
        if self.current:
            return self.current.popleft()
        if self.merges:
            return self.merges.popleft()
        return None

    def reduced(self, task: TensorTask) -> None:
        """The task's reduction is complete: its blocks are merged next."""
        blocks = self.reducing[task.name].blocks
        self.merges.extendleft(("merge", task, rows, 0) for rows in reversed(blocks))
        self.active = False

    def __bool__(self) -> bool:
        return bool(self.merges or self.jobs or self.current)
