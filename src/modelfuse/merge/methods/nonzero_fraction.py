"""The largest ``fraction`` of a tensor's non-zero values, found in the pass that counts them.

SCE keeps the ``k = int(select_topk * nnz)`` entries of largest variance, ``nnz``
the entries whose variance is non-zero: ``k`` is known only once every value
has been seen. When the values are computed again for every pass (a large
tensor), a first pass to count and a second to select cost two passes;
:func:`select_nonzero_fraction` does both in one whenever a strided sample
predicts where the k-th largest lies: it counts the non-zero values, the values
above a bracket around the predicted k-th largest, and gathers those inside it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from modelfuse.merge.methods.magnitude_selection import band_threshold, bracket_ranks
from modelfuse.merge.methods.magnitude_threshold import Chunks, MagnitudeThreshold

__all__ = ["BAND_ENTRIES", "select_nonzero_fraction"]

BAND_ENTRIES = 1 << 22
"""The most values the sample may predict inside the bracket (16 MB of float32); a wider
band is not gathered, and the selection takes a pass of its own."""


def select_nonzero_fraction(
    chunks: Chunks, fraction: float, n: int, sample: torch.Tensor
) -> tuple[int, MagnitudeThreshold | None]:
    """``(k, threshold)``: ``k = int(fraction * nnz)`` over the ``n`` non-negative values
    that ``chunks`` yields (called once), and the exact selection of the ``k`` largest
    (:func:`~modelfuse.merge.methods.magnitude_selection.select_top_k`'s), or None when
    ``k`` is 0 or the k-th largest fell outside the bracket the ``sample`` (strided, at
    least 64 values) predicted: the caller then selects in a pass of its own.

    Examples
    --------
    >>> values = torch.arange(1000.0) % 10  # a tenth are zeros
    >>> k, found = select_nonzero_fraction(lambda: [values], 0.5, 1000, values[::7].clone())
    >>> k, found.value if found is not None else None  # 450 of the 900 non-zero: 5 and above
    (450, 5.0)
    """
    ascending = np.sort(sample.reshape(-1).numpy())
    m = ascending.size
    share = np.count_nonzero(ascending) / m  # the non-zero fraction, estimated
    expected = n * share * fraction
    spread = n * fraction * math.sqrt(share * (1.0 - share) / m) + 1.0
    fewest = min(n, max(1, int(expected - 6.0 * spread)))
    most = min(n, max(1, int(expected + 6.0 * spread) + 1))
    upper = float(ascending[m - bracket_ranks(fewest, n, m)[0]])
    lower = float(ascending[m - bracket_ranks(most, n, m)[1]])
    predicted = np.count_nonzero((ascending >= lower) & (ascending <= upper) & (ascending > 0))
    gather = predicted * n / m <= BAND_ENTRIES
    nonzero = above = 0
    bands = []
    for chunk in chunks():
        flat = chunk.reshape(-1)
        nonzero += int(torch.count_nonzero(flat))
        if gather:
            above += int(torch.count_nonzero(flat > upper))
            values = flat.numpy()
            inside = (values >= lower) & (values <= upper) & (values > 0)
            bands.append(torch.from_numpy(np.compress(inside, values)))
    k = int(nonzero * fraction)
    if k == 0 or not gather:
        return k, None
    band = torch.cat(bands) if bands else torch.empty(0)
    if not above < k <= above + band.numel():
        return k, None
    return k, band_threshold(band, above, k, n)
