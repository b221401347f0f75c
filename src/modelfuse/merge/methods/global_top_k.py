"""Exact top-k selection by magnitude over a whole model (TIES ``scope: global``).

A radix selection on the float32 bit patterns of the magnitudes, which order
like the values for non-negative floats: pass 1 counts the top 16 bits of
every magnitude (one histogram of 32768 bins per model), which locates the bin
holding the k-th largest; pass 2 counts the low 16 bits inside that bin, which
gives the exact k-th largest value. Only when several entries equal that value
and not all of them fit in ``k`` does a third pass count them per tensor.
Memory is two histograms per model, whatever the model size. Ties at the
threshold go to the earlier tensor in the model, then the lower flat index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.methods.magnitude_threshold import (
    HIGH_BINS,
    LOW_BINS,
    MagnitudeThreshold,
    check_magnitudes,
    count_at_or_above,
    kept_count,
    magnitude_bits,
)

__all__ = ["MagnitudeStream", "global_top_k"]


MagnitudeStream = Callable[[], Iterable[tuple[str, Sequence[torch.Tensor]]]]
"""Calling it yields ``(name, [magnitudes of model 0, model 1, ...])`` over the tensors."""


def global_top_k(
    magnitudes: MagnitudeStream,
    density: Sequence[float],
) -> list[MagnitudeThreshold]:
    """Per model, the exact selection of its ``max(1, int(density * n))`` largest
    magnitudes (:func:`kept_count`) over every tensor of the stream, holding two
    histograms per model in memory.

    Parameters
    ----------
    magnitudes : callable
        Each call yields ``(name, [m_0, ..., m_{N-1}])``, the non-negative
        magnitudes of every model for one tensor, in the same order every time.
        It is called two or three times.
    density : sequence of float
        The fraction of entries each model keeps.

    Returns
    -------
    list of MagnitudeThreshold
        One per model.

    Examples
    --------
    >>> chunks = {"a": [torch.tensor([0.25, 0.75])], "b": [torch.tensor([0.5, 0.125, 0.625])]}
    >>> [t.value for t in global_top_k(lambda: chunks.items(), [0.4])]
    [0.625]
    """
    n_models = len(density)
    high = [torch.zeros(HIGH_BINS, dtype=torch.int64) for _ in range(n_models)]
    total = 0
    for _, mags in magnitudes():
        if len(mags) != n_models:
            raise ConfigError(f"{len(mags)} models in the stream but {n_models} densities")
        total += mags[0].numel() if mags else 0
        for i, m in enumerate(mags):
            high[i] += torch.bincount(magnitude_bits(m) >> 16, minlength=HIGH_BINS)
    wanted = [kept_count(d, total) for d in density]
    results: list[MagnitudeThreshold | None] = [None] * n_models
    high_bin = [0] * n_models
    above = [0] * n_models
    for i, k in enumerate(wanted):
        if k <= 0:
            results[i] = MagnitudeThreshold(float("inf"), 0, total)
        elif k >= total:
            results[i] = MagnitudeThreshold(float("-inf"), total, total)
        else:
            at_or_above = count_at_or_above(high[i])
            high_bin[i] = int((at_or_above >= k).nonzero().max())
            if high_bin[i] + 1 < HIGH_BINS:
                above[i] = int(at_or_above[high_bin[i] + 1])
    active = [i for i in range(n_models) if results[i] is None]
    if not active:
        return [r for r in results if r is not None]

    low = {i: torch.zeros(LOW_BINS, dtype=torch.int64) for i in active}
    for _, mags in magnitudes():
        for i in active:
            bits = magnitude_bits(mags[i])
            inside = bits[(bits >> 16) == high_bin[i]] & 0xFFFF
            low[i] += torch.bincount(inside, minlength=LOW_BINS)
    value: dict[int, float] = {}
    ties_needed: dict[int, int] = {}
    ties_total: dict[int, int] = {}
    for i in active:
        at_or_above = count_at_or_above(low[i]) + above[i]
        low_bin = int((at_or_above >= wanted[i]).nonzero().max())
        strictly = int(at_or_above[low_bin + 1]) if low_bin + 1 < LOW_BINS else above[i]
        bits = torch.tensor([(high_bin[i] << 16) | low_bin], dtype=torch.int32)
        value[i] = float(bits.view(torch.float32))
        ties_needed[i] = wanted[i] - strictly
        ties_total[i] = int(low[i][low_bin])

    partial = [i for i in active if ties_needed[i] < ties_total[i]]
    quotas: dict[int, dict[str, int]] = {i: {} for i in partial}
    if partial:
        left = {i: ties_needed[i] for i in partial}
        for name, mags in magnitudes():
            for i in partial:
                if left[i] <= 0:
                    continue
                count = int(torch.count_nonzero(check_magnitudes(mags[i]) == value[i]))
                if count:
                    quotas[i][name] = min(count, left[i])
                    left[i] -= quotas[i][name]
    for i in active:
        results[i] = MagnitudeThreshold(
            value[i], wanted[i], total, quotas[i] if i in quotas else None
        )
    return [r for r in results if r is not None]
