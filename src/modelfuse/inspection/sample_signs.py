"""The overlap and sign-conflict sums of task vectors held whole in memory (the strided
sample of :func:`~modelfuse.inspection.figures.streamed_figures`), a whole row at a time.

The sums are those of the chunked pass of :mod:`~modelfuse.inspection.figures`, in a few
numpy operations per row: the top-k sets of
:func:`~modelfuse.merge.methods.in_memory_top_k.top_k_members` and TIES' election
counted on booleans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from modelfuse.inspection.selection import Consensus
from modelfuse.merge.methods.in_memory_top_k import top_k_members

__all__ = ["WHOLE_ROWS", "SignSums", "add_gram", "sample_sign_sums"]

WHOLE_ROWS = 1 << 20
"""Rows of at most this many entries are measured whole (float32 sums of 0/1 and +-1
stay exact far below 2**24, and a few buffers of N such rows stay small)."""


@dataclass(frozen=True)
class SignSums:
    """The sums behind the overlap and the sign conflict (see
    :class:`~modelfuse.inspection.figures.TaskVectorFigures`)."""

    shared: np.ndarray
    nonzero: np.ndarray
    dropped: np.ndarray
    trimmed_nonzero: np.ndarray | None
    trimmed_dropped: np.ndarray | None


def add_gram(rows: torch.Tensor, into: np.ndarray) -> None:
    """Add the pairwise dot products of ``rows`` (N, L) to ``into``: one dot per pair for a
    few rows (faster than a matrix product of this shape), a matrix product for more."""
    if rows.shape[0] > 3:
        into += (rows @ rows.T).double().numpy()
        return
    values = rows.numpy()  # numpy's float32 dot: faster than torch's
    for i in range(rows.shape[0]):
        for j in range(i + 1):
            value = float(np.dot(values[i], values[j]))
            into[i, j] += value
            if i != j:
                into[j, i] += value


def _elect(values: np.ndarray, consensus: Consensus) -> tuple[np.ndarray, np.ndarray]:
    """TIES' election over ``values`` (N, n), the weighted, trimmed task vectors: each
    model's non-zero entries, and those whose sign differs from the elected one (the sign
    of the sum, or of the count of signs, zero electing +)."""
    positive, negative = values > 0.0, values < 0.0
    if consensus == "count":
        against = positive.sum(0, dtype=np.int64) < negative.sum(0, dtype=np.int64)
    else:
        tally = values[0].copy()
        for row in values[1:]:  # in model order, as the merge adds them
            tally += row
        against = tally < 0.0  # where - is elected
    nonzero, dropped = np.zeros(len(values)), np.zeros(len(values))
    for i, (up, down) in enumerate(zip(positive, negative)):  # whole-row counts: the fast ones
        nonzero[i] = np.count_nonzero(up) + np.count_nonzero(down)
        up &= against
        down &= ~against
        dropped[i] = np.count_nonzero(up) + np.count_nonzero(down)
    return nonzero, dropped


def _trimmed(
    taus: np.ndarray, kept: np.ndarray | None, weights: np.ndarray, unweighted: bool
) -> np.ndarray:
    """The weighted task vectors, zero outside ``kept`` (None: every entry)."""
    values = taus if kept is None else np.multiply(taus, kept, dtype=np.float32)
    if not unweighted:
        values = np.multiply(values, weights.astype(np.float32)[:, None], dtype=np.float32)
    return values


def sample_sign_sums(
    taus: torch.Tensor,
    weights: np.ndarray,
    overlap_k: Sequence[int],
    conflict_k: Sequence[int],
    consensus: Consensus,
) -> SignSums:
    """The sign sums of task vectors ``taus`` (N, n) float32, rows of at most
    :data:`WHOLE_ROWS` entries, each trimmed to its ``overlap_k`` and ``conflict_k``
    largest magnitudes (a count of ``n`` or more: no trim).

    Examples
    --------
    >>> taus = torch.tensor([[1.0, 2.0, 0.0, -1.0], [1.0, -3.0, 1.0, 0.0]])
    >>> s = sample_sign_sums(taus, np.ones(2), [2, 2], [4, 4], "sum")
    >>> s.dropped.tolist(), s.nonzero.tolist()  # entry 1: b's -3 outvotes a's 2
    ([1.0, 0.0], [3.0, 3.0])
    """
    n_models, n = taus.shape
    if n > WHOLE_ROWS:
        raise ValueError(f"sample_sign_sums: rows of {n} entries; at most {WHOLE_ROWS}")
    values = taus.detach().contiguous().numpy()
    magnitudes = np.abs(values)
    sets = np.stack([top_k_members(magnitudes[i], overlap_k[i]) for i in range(n_models)])
    shared = np.zeros((n_models, n_models))
    for i in range(n_models):
        shared[i, i] = np.count_nonzero(sets[i])
        for j in range(i):
            shared[i, j] = shared[j, i] = np.count_nonzero(sets[i] & sets[j])
    unweighted = bool((weights == 1.0).all())
    trimmed = list(overlap_k) != list(conflict_k)
    if all(k >= n for k in conflict_k):  # the election sees every entry
        kept = None
    elif trimmed:
        kept = np.stack([top_k_members(magnitudes[i], conflict_k[i]) for i in range(n_models)])
    else:
        kept = sets
    nonzero, dropped = _elect(_trimmed(values, kept, weights, unweighted), consensus)
    if not trimmed:
        return SignSums(shared, nonzero, dropped, None, None)
    trimmed_nonzero, trimmed_dropped = _elect(
        _trimmed(values, sets, weights, unweighted), consensus
    )
    return SignSums(shared, nonzero, dropped, trimmed_nonzero, trimmed_dropped)
