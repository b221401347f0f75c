"""Exact top-k selection by magnitude, for one tensor or a whole model streamed once per pass.

Trimming a task vector to a ``density`` keeps its ``k = int(density * n)``
entries of largest magnitude. Both selections here are exact and never sort:

- :func:`top_k_mask` (one tensor): the k-th largest value is found inside a
  narrow band bracketed from a strided sample (checked by counting, with a
  radix histogram on the float bits as the fall-back), then ``kthvalue`` runs
  on the band only.
- :func:`global_top_k` (a whole model, ``scope: global``): a radix selection on
  the float32 bit patterns of the magnitudes, which order like the values for
  non-negative floats. Pass 1 counts the top 16 bits of every magnitude (one
  histogram of 32768 bins per model), which locates the bin holding the k-th
  largest; pass 2 counts the low 16 bits inside that bin, which gives the exact
  k-th largest value. Only when several entries equal that value and not all
  of them fit in ``k`` does a third pass count them per tensor. Memory is two
  histograms per model, whatever the model size.

Ties at the threshold are broken by position (the earlier tensor in the
model, then the lower flat index, wins), so exactly ``k`` entries are kept
and the result does not depend on the order in which tensors are merged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from modelfuse.errors import ConfigError

__all__ = [
    "MagnitudeThreshold",
    "global_top_k",
    "kth_largest",
    "top_k_mask",
]

_HIGH_BINS = 1 << 15  # top 16 bits of a non-negative float32 (sign bit is 0)
_LOW_BINS = 1 << 16
_SAMPLE = 1 << 16
_SMALL = 1 << 17


def _check_magnitudes(values: torch.Tensor) -> torch.Tensor:
    if values.dtype != torch.float32:
        values = values.to(torch.float32)
    return values.reshape(-1).contiguous()


def _kth_largest_radix(values: torch.Tensor, k: int) -> float:
    bits = values.view(torch.int32)
    high = bits >> 16
    counts = torch.bincount(high, minlength=_HIGH_BINS)
    above = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])  # count >= bin
    # The bin holding the k-th largest: the highest bin with count(>= bin) >= k.
    at_least = int((above >= k).nonzero().max())
    strictly_above = int(above[at_least + 1]) if at_least + 1 < _HIGH_BINS else 0
    band = values[high == at_least]
    rank = k - strictly_above
    return float(band.kthvalue(band.numel() - rank + 1).values)


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The exact k-th largest of non-negative values (``k`` from 1), without sorting.

    Parameters
    ----------
    values : Tensor
        Non-negative values (magnitudes), any shape; read as float32.
    k : int
        Rank from the top, ``1 <= k <= values.numel()``.

    Returns
    -------
    float

    Examples
    --------
    >>> kth_largest(torch.tensor([0.5, 3.0, 1.0, 2.0]), 2)
    2.0
    """
    flat = _check_magnitudes(values)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n <= _SMALL:
        return float(flat.kthvalue(n - k + 1).values)
    # Bracket the answer between two order statistics of a strided sample, then
    # check the bracket by counting; select exactly inside it.
    stride = n // _SAMPLE
    sample = flat[::stride]
    m = sample.numel()
    q = k / n
    margin = 6.0 * (q * (1.0 - q) / m) ** 0.5 + 4.0 / m
    hi_rank = max(1, int((q - margin) * m))  # fewer from the top: a larger value
    lo_rank = min(m, int((q + margin) * m) + 1)
    upper = float(sample.kthvalue(m - hi_rank + 1).values)
    lower = float(sample.kthvalue(m - lo_rank + 1).values)
    above = int(torch.count_nonzero(flat > upper))
    if above < k:
        band = flat[(flat >= lower) & (flat <= upper)]
        if above + band.numel() >= k:
            rank = k - above
            return float(band.kthvalue(band.numel() - rank + 1).values)
    return _kth_largest_radix(flat, k)


def _mask_with_ties(flat: torch.Tensor, threshold: float, k: int | None) -> torch.Tensor:
    """``flat >= threshold``; with ``k``, surplus ties are dropped from the highest index."""
    mask = flat >= threshold
    if k is None:
        return mask
    extra = int(torch.count_nonzero(mask)) - k
    if extra <= 0:
        return mask
    positions = (flat == threshold).nonzero().reshape(-1)
    mask[positions[positions.numel() - extra :]] = False
    return mask


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the ``k`` largest values; ties go to the lower flat index.

    Parameters
    ----------
    values : Tensor
        Non-negative values (magnitudes); not modified.
    k : int
        How many to keep; ``k <= 0`` keeps none, ``k >= numel`` keeps all.

    Returns
    -------
    Tensor of bool, the shape of ``values``.

    Examples
    --------
    >>> top_k_mask(torch.tensor([1.0, 3.0, 2.0, 3.0]), 2)
    tensor([False,  True, False,  True])
    >>> top_k_mask(torch.tensor([2.0, 2.0, 2.0]), 2)
    tensor([ True,  True, False])
    """
    n = values.numel()
    if k <= 0:
        return torch.zeros(values.shape, dtype=torch.bool)
    if k >= n:
        return torch.ones(values.shape, dtype=torch.bool)
    flat = _check_magnitudes(values)
    threshold = kth_largest(flat, k)
    return _mask_with_ties(flat, threshold, k).reshape(values.shape)


@dataclass(frozen=True)
class MagnitudeThreshold:
    """One model's whole-model selection of its ``kept`` largest magnitudes.

    Attributes
    ----------
    value : float
        The ``kept``-th largest magnitude over all selected tensors (``inf`` when
        nothing is kept, ``-inf`` when everything is).
    kept, total : int
        Entries kept, and entries over all selected tensors.
    tie_quota : dict name -> int, or None
        When not every entry equal to ``value`` fits, how many of them each
        tensor keeps (tensors not listed keep none); None keeps them all.
    """

    value: float
    kept: int
    total: int
    tie_quota: Mapping[str, int] | None = field(default=None)

    def mask(self, magnitudes: torch.Tensor, name: str) -> torch.Tensor:
        """The entries of tensor ``name`` this selection keeps."""
        flat = _check_magnitudes(magnitudes)
        if self.value == float("inf"):
            return torch.zeros(magnitudes.shape, dtype=torch.bool)
        if self.value == float("-inf"):
            return torch.ones(magnitudes.shape, dtype=torch.bool)
        if self.tie_quota is None:
            return _mask_with_ties(flat, self.value, None).reshape(magnitudes.shape)
        mask = flat > self.value
        quota = self.tie_quota.get(name, 0)
        if quota > 0:
            positions = (flat == self.value).nonzero().reshape(-1)[:quota]
            mask[positions] = True
        return mask.reshape(magnitudes.shape)


MagnitudeStream = Callable[[], Iterable[tuple[str, Sequence[torch.Tensor]]]]
"""Calling it yields ``(name, [magnitudes of model 0, model 1, ...])`` over the tensors."""


def _bits(magnitudes: torch.Tensor) -> torch.Tensor:
    return _check_magnitudes(magnitudes).view(torch.int32)


def global_top_k(
    magnitudes: MagnitudeStream,
    density: Sequence[float],
) -> list[MagnitudeThreshold]:
    """Per model, the exact selection of its ``int(density * n)`` largest magnitudes
    over every tensor of the stream, holding two histograms per model in memory.

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
    high = [torch.zeros(_HIGH_BINS, dtype=torch.int64) for _ in range(n_models)]
    total = 0
    for _, mags in magnitudes():
        if len(mags) != n_models:
            raise ConfigError(f"{len(mags)} models in the stream but {n_models} densities")
        total += mags[0].numel() if mags else 0
        for i, m in enumerate(mags):
            high[i] += torch.bincount(_bits(m) >> 16, minlength=_HIGH_BINS)
    wanted = [int(d * total) for d in density]
    results: list[MagnitudeThreshold | None] = [None] * n_models
    high_bin = [0] * n_models
    above = [0] * n_models
    for i, k in enumerate(wanted):
        if k <= 0:
            results[i] = MagnitudeThreshold(float("inf"), 0, total)
        elif k >= total:
            results[i] = MagnitudeThreshold(float("-inf"), total, total)
        else:
            at_or_above = torch.flip(torch.cumsum(torch.flip(high[i], [0]), 0), [0])
            high_bin[i] = int((at_or_above >= k).nonzero().max())
            if high_bin[i] + 1 < _HIGH_BINS:
                above[i] = int(at_or_above[high_bin[i] + 1])
    active = [i for i in range(n_models) if results[i] is None]
    if not active:
        return [r for r in results if r is not None]

    low = {i: torch.zeros(_LOW_BINS, dtype=torch.int64) for i in active}
    for _, mags in magnitudes():
        for i in active:
            bits = _bits(mags[i])
            inside = bits[(bits >> 16) == high_bin[i]] & 0xFFFF
            low[i] += torch.bincount(inside, minlength=_LOW_BINS)
    value: dict[int, float] = {}
    ties_needed: dict[int, int] = {}
    ties_total: dict[int, int] = {}
    for i in active:
        at_or_above = torch.flip(torch.cumsum(torch.flip(low[i], [0]), 0), [0]) + above[i]
        low_bin = int((at_or_above >= wanted[i]).nonzero().max())
        strictly = int(at_or_above[low_bin + 1]) if low_bin + 1 < _LOW_BINS else above[i]
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
                count = int(torch.count_nonzero(_check_magnitudes(mags[i]) == value[i]))
                if count:
                    quotas[i][name] = min(count, left[i])
                    left[i] -= quotas[i][name]
    for i in active:
        results[i] = MagnitudeThreshold(
            value[i], wanted[i], total, quotas[i] if i in quotas else None
        )
    return [r for r in results if r is not None]

