"""The top-k sets and TIES' sign election, chunk by chunk, behind the overlap and the sign
conflict of :mod:`modelfuse.inspection.figures`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from modelfuse.merge.methods.magnitude_selection import sample_stride, select_top_ks
from modelfuse.merge.methods.magnitude_threshold import TensorSelection

__all__ = [
    "LEAST_POSITIVE",
    "Consensus",
    "Cut",
    "Election",
    "TaskVectorChunks",
    "find_cuts",
    "members",
]

_SAMPLED = 1 << 17  # above this many entries the selection brackets from a strided sample

Consensus = Literal["sum", "count"]


class TaskVectorChunks:
    """Task-vector magnitudes of one model, chunk by chunk: each call of :meth:`magnitudes`
    is one pass.

    ``base`` None: ``model`` holds the magnitudes already (float32), handed out as views.
    """

    def __init__(self, model: torch.Tensor, base: torch.Tensor | None, chunk: int) -> None:
        self.model, self.base, self.chunk = model, base, chunk
        self.n = model.numel() if base is None else base.numel()

    def magnitudes(self) -> Any:
        if self.base is None:
            for start in range(0, self.n, self.chunk):
                yield self.model[start : start + self.chunk]
            return
        out = torch.empty(min(self.chunk, self.n))
        base = torch.empty_like(out)
        for start in range(0, self.n, self.chunk):
            stop = min(start + self.chunk, self.n)
            part = base[: stop - start].copy_(self.base[start:stop])
            # every difference is a float32 one, of the float32 entries
            yield out[: stop - start].copy_(self.model[start:stop]).sub_(part).abs_()

    def sample(self) -> torch.Tensor | None:
        if self.n <= _SAMPLED:
            return None
        stride = sample_stride(self.n)
        if self.base is None:
            return self.model[::stride].clone()
        return (
            self.model[::stride].to(torch.float32) - self.base[::stride].to(torch.float32)
        ).abs_()


LEAST_POSITIVE = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23
"""The least positive float32: a top-k set's threshold is never below it, so zeros never belong."""


class Cut:
    """A top-k set as one comparison per chunk: ``|tau| >= at`` before flat index ``cutoff``
    and ``|tau| > at`` from it on (ties at the threshold go to the lower index); zeros never
    belong (the threshold is at least the least positive float32)."""

    def __init__(self, selection: TensorSelection | None) -> None:
        if selection is None:  # every entry: every non-zero one
            self.at, self.cutoff = LEAST_POSITIVE, None
        else:
            self.at, self.cutoff = max(selection.value, LEAST_POSITIVE), selection.cutoff
        self.above = float(torch.nextafter(torch.tensor(self.at), torch.tensor(float("inf"))))

    def bound(self, start: int, length: int) -> float | int:
        """The threshold of ``>=`` over entries ``start:start + length``, or the position
        inside them where it changes from ``at`` to ``above``."""
        if self.cutoff is None or self.cutoff >= start + length:
            return self.at
        if self.cutoff <= start:
            return self.above
        return self.cutoff - start  # an int: the block is split


def find_cuts(chunks: TaskVectorChunks, counts: list[int]) -> dict[int, Cut]:
    """The top-k set of each count, found exactly (see :func:`select_top_ks`)."""
    wanted = sorted({k for k in counts if k < chunks.n})
    found = {k: Cut(None) for k in counts if k >= chunks.n}
    if wanted:
        thresholds = select_top_ks(chunks.magnitudes, wanted, chunks.n, chunks.sample())
        for k, threshold in zip(wanted, thresholds):
            found[k] = Cut(TensorSelection.of(threshold, chunks.magnitudes))
    return found


def members(
    magnitudes: torch.Tensor, cuts: Sequence[Cut], start: int, out: torch.Tensor
) -> torch.Tensor:
    """0/1 floats (N, L): whether each entry is in its model's top-k set."""
    length = magnitudes.shape[1]
    # comparisons into float buffers, row by row: much faster than into bool tensors
    for i, cut in enumerate(cuts):
        bound = cut.bound(start, length)
        if isinstance(bound, float):
            torch.ge(magnitudes[i], bound, out=out[i])
        else:
            torch.ge(magnitudes[i, :bound], cut.at, out=out[i, :bound])
            torch.ge(magnitudes[i, bound:], cut.above, out=out[i, bound:])
    return out


class Election:
    """Running counts of non-zero and rejected entries per model, chunk by chunk."""

    def __init__(self, n_models: int, consensus: Consensus) -> None:
        self.nonzero = np.zeros(n_models)
        self.dropped = np.zeros(n_models)
        self.consensus = consensus

    def add(self, values: torch.Tensor, signs: torch.Tensor, tally: torch.Tensor) -> None:
        """``values`` (N, L): the weighted, trimmed task vectors; ``signs`` a buffer like it
        and ``tally`` one of length L."""
        torch.sign(values, out=signs)
        votes = signs if self.consensus == "count" else values
        tally.copy_(votes[0])
        for row in votes[1:]:
            tally.add_(row)
        elected = tally.sign_().add_(0.5).sign_()  # +1 where the tally is >= 0 (zero elects +)
        rows, choice = signs.numpy(), elected.numpy()  # numpy's float32 dot: faster than torch's
        for i, row in enumerate(rows):
            # |s| counts the non-zero entries; s . elected is agreeing minus rejected ones
            # (float sums of +-1 are exact within a chunk)
            nonzero = float(np.dot(row, row))
            self.nonzero[i] += nonzero
            self.dropped[i] += (nonzero - float(np.dot(row, choice))) / 2
