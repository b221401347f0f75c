"""Exact top-k selection by magnitude, for one tensor or a whole model streamed once per pass.

Trimming a task vector to a ``density`` keeps its ``k = max(1, int(density * n))``
entries of largest magnitude (:func:`~modelfuse.merge.methods.magnitude_threshold.kept_count`, mergekit 0.1.5's count). Both
selections are exact and never sort:

- :func:`select_top_k` (one tensor, read chunk by chunk): the k-th largest
  value is found inside a narrow band bracketed from a strided sample (checked
  by counting in the same pass, with a radix histogram on the float bits as the
  fall-back), then ``kthvalue`` runs on the band only. :func:`top_k_mask` and
  :func:`kth_largest` are its whole-tensor forms.
- :func:`~modelfuse.merge.methods.global_top_k.global_top_k` (a whole model, ``scope: global``): a radix selection on
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

import math
from collections.abc import Sequence

import numpy as np
import torch

from modelfuse.merge.methods.magnitude_threshold import (
    HIGH_BINS,
    LOW_BINS,
    Chunks,
    MagnitudeThreshold,
    check_magnitudes,
    count_at_or_above,
    count_ones,
    magnitude_bits,
    scratch_buffer,
)

__all__ = [
    "bracket_ranks",
    "guess_chance",
    "kth_largest",
    "sample_stride",
    "select_top_k",
    "select_top_ks",
    "top_k_mask",
]

_SAMPLE = 1 << 16
_SMALL = 1 << 17


def sample_stride(n: int) -> int:
    """The stride of the strided sample that brackets a selection among ``n`` values.

    The sample's two order statistics cost about ``m`` (its size) and the band
    they leave about ``n / sqrt(m)``; ``m = (3 n)^(2/3)``, at most 65536,
    balances the two (measured: 2x faster than 65536 for a 1M-entry tensor).
    """
    target = min(_SAMPLE, max(1024, int((3 * n) ** (2 / 3))))
    return max(1, n // target)


def _finish(band: torch.Tensor, above: int, k: int, n: int) -> MagnitudeThreshold:
    """The k-th largest, knowing ``above`` entries exceed every entry of ``band``."""
    rank = k - above
    value = float(band.kthvalue(band.numel() - rank + 1).values)
    greater = above + int(torch.count_nonzero(band > value))
    ties = int(torch.count_nonzero(band == value))
    quota = k - greater
    return MagnitudeThreshold(value, k, n, None if quota == ties else {"": quota})


def _select_radix(chunks: Chunks, k: int, n: int) -> MagnitudeThreshold:
    counts = torch.zeros(HIGH_BINS, dtype=torch.int64)
    for chunk in chunks():
        counts += torch.bincount(magnitude_bits(chunk) >> 16, minlength=HIGH_BINS)
    at_or_above = count_at_or_above(counts)
    high = int((at_or_above >= k).nonzero().max())
    above = int(at_or_above[high + 1]) if high + 1 < HIGH_BINS else 0
    band = torch.cat([c.reshape(-1)[(magnitude_bits(c) >> 16) == high] for c in chunks()])
    return _finish(band, above, k, n)


def select_top_k(
    chunks: Chunks, k: int, n: int, sample: torch.Tensor | None = None
) -> MagnitudeThreshold:
    """The exact selection of the ``k`` largest of ``n`` non-negative values, without sorting.

    Parameters
    ----------
    chunks : callable
        Each call yields the values chunk by chunk in index order (float32); it
        is called once, or three times when the bracket fails.
    k, n : int
        How many to keep, and how many values there are.
    sample : Tensor, optional
        Some of the values (e.g. every ``n // 65536``-th); their order
        statistics bracket the answer, which one counting pass then checks.
        Without it the selection is a radix histogram of the float bits.

    Returns
    -------
    MagnitudeThreshold
        ``tie_quota`` is ``{"": q}`` when only the first ``q`` entries equal
        to the threshold are kept.

    Examples
    --------
    >>> values = torch.tensor([0.5, 3.0, 1.0, 2.0, 2.0])
    >>> s = select_top_k(lambda: [values], 2, 5)
    >>> s.value, s.tie_quota
    (2.0, {'': 1})
    """
    return select_top_ks(chunks, [k], n, sample)[0]


def select_top_ks(
    chunks: Chunks, ks: Sequence[int], n: int, sample: torch.Tensor | None = None
) -> list[MagnitudeThreshold]:
    """:func:`select_top_k` for several ``k`` at once, sharing the counting pass.

    Examples
    --------
    >>> values = torch.tensor([0.5, 3.0, 1.0, 2.0, 4.0])
    >>> [s.value for s in select_top_ks(lambda: [values], [1, 3], 5)]
    [4.0, 2.0]
    """
    results: list[MagnitudeThreshold | None] = [None] * len(ks)
    trackers: list[tuple[int, _Band | _BitRange | _Guess]] = []
    ordered = None
    if sample is not None and sample.numel() >= 64:
        # several selections read up to three order statistics each: sort the sample once
        ordered = _Sample(check_magnitudes(sample), presort=sum(0 < k < n for k in ks) > 1)
    for j, k in enumerate(ks):
        if k <= 0:
            results[j] = MagnitudeThreshold(float("inf"), 0, n)
        elif k >= n:
            results[j] = MagnitudeThreshold(float("-inf"), n, n)
        elif ordered is None:
            if n <= _SMALL:
                values = torch.cat([c.reshape(-1).clone() for c in chunks()])
                results[j] = _finish(values, 0, k, n)
            else:
                results[j] = _select_radix(chunks, k, n)
        else:
            trackers.append((j, _tracker(ordered, k, n)))
    if trackers:
        scratch: dict[str, torch.Tensor] = {}
        for chunk in chunks():
            chunk = chunk.reshape(-1)
            for _, tracker in trackers:
                tracker.update(chunk, scratch)
        for j, tracker in trackers:
            results[j] = tracker.result(chunks)
    return [r for r in results if r is not None]


class _Sample:
    """A sample of the values and its order statistics (``kthvalue``, or one sort when
    many are read)."""

    def __init__(self, values: torch.Tensor, presort: bool = False) -> None:
        self.values = values
        self.m = values.numel()
        self.ascending = (
            np.sort(values.numpy()) if presort and values.dtype == torch.float32 else None
        )

    def largest(self, rank: int) -> float:
        """The ``rank``-th largest (from 1)."""
        if self.ascending is not None:
            return float(self.ascending[self.m - rank])
        return float(self.values.kthvalue(self.m - rank + 1).values)


def _tracker(sample: _Sample, k: int, n: int) -> _Band | _BitRange | _Guess:
    """A tracker for the k-th largest, from the sample.

    When one value fills the sample well around rank ``k / n`` (heavily tied
    data, such as the task vectors of bfloat16 checkpoints) it is very likely
    the answer, and counting the values above it and equal to it checks that
    exactly (:class:`_Guess`). Otherwise the answer is bracketed between two
    order statistics of the sample.
    """
    guess = _likely(sample, k, n)
    if guess is not None:
        return _Guess(k, n, guess, sample)
    return _bracket(sample, k, n)


def _likely(sample: _Sample, k: int, n: int) -> float | None:
    """The sample's value at rank ``k / n`` when it is more likely than not the k-th
    largest of all ``n`` values, else None."""
    m = sample.m
    guess = sample.largest(min(m, max(1, round(k / n * m))))
    scratch = torch.empty(m)
    above = count_ones(torch.gt(sample.values, guess, out=scratch))
    equal = count_ones(torch.eq(sample.values, guess, out=scratch))
    return guess if guess_chance(above, equal, k, n, m) >= 0.5 else None


def guess_chance(above: int, equal: int, k: int, n: int, m: int) -> float:
    """The chance that a value is the k-th largest of ``n`` values when, in a sample of
    ``m`` of them, ``above`` exceed it and ``equal`` equal it.

    The k-th largest falls at a sample rank ~ Normal(q m, sigma m), q = k / n. Counting
    the values above and equal to a guess costs about a third of gathering a band, so a
    wrong guess (one more pass) is worth the risk from an even chance on.

    Examples
    --------
    >>> round(guess_chance(400, 200, 500, 1000, 1000), 3)  # rank 500 falls inside 401..600
    1.0
    """
    q = k / n
    spread = max((q * (1.0 - q) / m) ** 0.5 * m, 1.0)
    return _normal_cdf((above + equal - q * m) / spread) - _normal_cdf((above - q * m) / spread)


def bracket_ranks(k: int, n: int, m: int) -> tuple[int, int]:
    """The ranks from the top, in a sample of ``m`` of ``n`` values, of two order statistics
    that bracket the k-th largest of all of them (a six-sigma margin), the larger first.

    Examples
    --------
    >>> bracket_ranks(500, 1000, 1000)
    (401, 599)
    """
    q = k / n
    margin = 6.0 * (q * (1.0 - q) / m) ** 0.5 + 4.0 / m
    return max(1, int((q - margin) * m)), min(m, int((q + margin) * m) + 1)


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _bracket(sample: _Sample, k: int, n: int) -> _Band | _BitRange:
    """Bracket the k-th largest between two order statistics of the sample."""
    hi_rank, lo_rank = bracket_ranks(k, n, sample.m)
    upper = sample.largest(hi_rank)
    lower = sample.largest(lo_rank)
    low_bits = _float_bits(lower)
    span = _float_bits(upper) - low_bits
    if span < LOW_BINS:
        return _BitRange(k, n, low_bits, span)
    return _Band(k, n, lower, upper)


class _Guess:
    """Counts the values above and equal to a likely k-th largest; exact when it is.

    Two comparisons per value and nothing gathered: much cheaper than a band.
    When the guess is wrong (the counts say so) a bracket from the sample takes
    one more pass.
    """

    def __init__(self, k: int, n: int, value: float, sample: _Sample) -> None:
        self.k, self.n, self.value, self.sample = k, n, value, sample
        self.above = self.equal = 0

    def update(self, chunk: torch.Tensor, scratch: dict[str, torch.Tensor]) -> None:
        # numpy's comparisons into bools and its count of them are vectorised
        values = check_magnitudes(chunk).numpy()
        flags = scratch_buffer(scratch, "flags", values.size, torch.bool).numpy()
        self.above += int(np.count_nonzero(np.greater(values, self.value, out=flags)))
        self.equal += int(np.count_nonzero(np.equal(values, self.value, out=flags)))

    def result(self, chunks: Chunks) -> MagnitudeThreshold:
        if self.above < self.k <= self.above + self.equal:
            quota = self.k - self.above
            tie_quota = None if quota == self.equal else {"": quota}
            return MagnitudeThreshold(self.value, self.k, self.n, tie_quota)
        tracker = _bracket(self.sample, self.k, self.n)
        scratch: dict[str, torch.Tensor] = {}
        for chunk in chunks():
            tracker.update(chunk.reshape(-1), scratch)
        return tracker.result(chunks)


def _float_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float32).view(torch.int32))


class _Band:
    """Counts the values above the bracket and collects those inside it (continuous data)."""

    def __init__(self, k: int, n: int, lower: float, upper: float) -> None:
        self.k, self.n, self.lower, self.upper = k, n, lower, upper
        self.above = 0
        self.bands: list[torch.Tensor] = []

    def update(self, chunk: torch.Tensor, scratch: dict[str, torch.Tensor]) -> None:
        # numpy's comparisons into bools and its logical and and count on them are
        # vectorised: about 40% less time than float flags multiplied and converted
        values = check_magnitudes(chunk).numpy()
        at_least = scratch_buffer(scratch, "at least", values.size, torch.bool).numpy()
        at_most = scratch_buffer(scratch, "at most", values.size, torch.bool).numpy()
        np.greater_equal(values, self.lower, out=at_least)
        reached = int(np.count_nonzero(at_least))
        np.less_equal(values, self.upper, out=at_most)
        band = np.compress(np.logical_and(at_least, at_most, out=at_least), values)
        self.above += reached - band.size  # at least the lower bound, and not inside: above
        self.bands.append(torch.from_numpy(band))

    def result(self, chunks: Chunks) -> MagnitudeThreshold:
        band = torch.cat(self.bands)
        if self.above < self.k <= self.above + band.numel():
            return _finish(band, self.above, self.k, self.n)
        return _select_radix(chunks, self.k, self.n)  # the bracket missed


class _BitRange:
    """Counts bit patterns inside the bracket when it holds few distinct float32 values.

    Every value's bit pattern, offset from ``low_bits`` and clamped, is counted:
    bin 0 holds those below the bracket, bin ``span + 2`` those above it.
    """

    def __init__(self, k: int, n: int, low_bits: int, span: int) -> None:
        self.k, self.n, self.low_bits, self.span = k, n, low_bits, span
        self.counts = torch.zeros(span + 3, dtype=torch.int64)

    def update(self, chunk: torch.Tensor, scratch: dict[str, torch.Tensor]) -> None:
        bits = magnitude_bits(chunk)
        buffer = scratch_buffer(scratch, "bits", bits.numel(), bits.dtype)
        offset = torch.sub(bits, self.low_bits - 1, out=buffer).clamp_(0, self.span + 2)
        self.counts += torch.bincount(offset, minlength=self.span + 3)

    def result(self, chunks: Chunks) -> MagnitudeThreshold:
        k, counts = self.k, self.counts
        at_or_above = count_at_or_above(counts)
        if not int(at_or_above[1]) >= k > int(at_or_above[self.span + 2]):
            return _select_radix(chunks, k, self.n)  # the bracket missed
        position = int((at_or_above >= k).nonzero().max())
        bits = torch.tensor([self.low_bits + position - 1], dtype=torch.int32)
        value = float(bits.view(torch.float32))
        greater = int(at_or_above[position + 1])
        quota = k - greater
        ties = int(counts[position])
        return MagnitudeThreshold(value, k, self.n, None if quota == ties else {"": quota})


def _strided_sample(values: torch.Tensor) -> torch.Tensor | None:
    n = values.numel()
    return values[:: sample_stride(n)] if n > _SMALL else None


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
    flat = check_magnitudes(values)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if k == n:
        return float(flat.min())
    return select_top_k(lambda: [flat], k, n, _strided_sample(flat)).value


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
    flat = check_magnitudes(values)
    selection = select_top_k(lambda: [flat], k, flat.numel(), _strided_sample(flat))
    return selection.masker("")(flat).reshape(values.shape)
