"""The exact top-k set of a row of magnitudes held in memory, in numpy and without sorting.

For a row short enough to keep whole (such as the strided samples that
``modelfuse inspect`` measures), a handful of comparisons settle the selection
of :func:`~modelfuse.merge.methods.magnitude_selection.select_top_k`, with the same
rule: the ``k`` largest, ties at the threshold to the lower index, zeros never
(a count past the non-zero entries keeps those only).
"""

from __future__ import annotations

import numpy as np
import torch

from modelfuse.merge.methods.magnitude_selection import (
    bracket_ranks,
    guess_chance,
    sample_stride,
    select_top_k,
)
from modelfuse.merge.methods.magnitude_threshold import TensorSelection

__all__ = ["top_k_members"]


def _members(values: np.ndarray, value: float, greater: int, equal: int, k: int) -> np.ndarray:
    """The k largest, knowing ``greater`` values exceed ``value`` and ``equal`` equal it
    (``greater < k <= greater + equal``)."""
    kept = values > value
    ties = values == value
    quota = k - greater
    if quota < equal:  # the first `quota` values equal to the threshold belong
        ties[int(np.flatnonzero(ties)[quota - 1]) + 1 :] = False
    kept |= ties
    return kept


def top_k_members(values: np.ndarray, k: int) -> np.ndarray:
    """Whether each of the non-negative float32 ``values`` is among the ``k`` largest.

    A strided sample of the row gives the answer's likely value (heavily tied
    values, such as the task vectors of bfloat16 checkpoints) or two order
    statistics that bracket it; counting the row against them finds it exactly,
    and the rare miss takes :func:`~modelfuse.merge.methods.magnitude_selection.select_top_k`.

    Parameters
    ----------
    values : ndarray
        One row of non-negative float32 values (magnitudes). Not modified.
    k : int
        How many to keep.

    Returns
    -------
    ndarray of bool

    Examples
    --------
    >>> top_k_members(np.array([2.0, 3.0, 2.0, 0.0], dtype=np.float32), 2).tolist()
    [True, True, False, False]
    >>> top_k_members(np.array([2.0, 0.0, 1.0], dtype=np.float32), 3).tolist()  # zeros never
    [True, False, True]
    """
    n = values.size
    if k >= n:
        return values > 0.0
    if k <= 0:
        return np.zeros(n, dtype=bool)
    sample = np.sort(values[:: sample_stride(n)])  # ascending
    m = sample.size
    guess = float(sample[m - min(m, max(1, round(k / n * m)))])
    below, past = np.searchsorted(sample, guess, "left"), np.searchsorted(sample, guess, "right")
    if guess > 0.0 and guess_chance(m - int(past), int(past - below), k, n, m) >= 0.5:
        greater = int(np.count_nonzero(values > guess))
        equal = int(np.count_nonzero(values == guess))
        if greater < k <= greater + equal:  # the guess is the k-th largest
            return _members(values, guess, greater, equal, k)
    hi_rank, lo_rank = bracket_ranks(k, n, m)
    upper, lower = float(sample[m - hi_rank]), float(sample[m - lo_rank])
    above = int(np.count_nonzero(values > upper))
    inside = values >= lower
    inside &= values <= upper
    band = values[inside]
    if above < k <= above + band.size:
        rank = band.size - (k - above)  # from the bottom of the band
        value = float(np.partition(band, rank)[rank])
        if value > 0.0:
            greater = above + int(np.count_nonzero(band > value))
            return _members(values, value, greater, int(np.count_nonzero(band == value)), k)
    # the bracket missed, or the threshold is zero: the streamed selection
    row = torch.from_numpy(values)
    chunks = lambda: [row]  # noqa: E731
    selection = TensorSelection.of(select_top_k(chunks, k, n, torch.from_numpy(sample)), chunks)
    kept = values > max(selection.value, 0.0)
    if selection.value > 0.0:
        ties = values == selection.value
        if selection.cutoff is not None:
            ties[selection.cutoff :] = False
        kept |= ties
    return kept
