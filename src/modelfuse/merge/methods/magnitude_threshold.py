"""The result of a magnitude selection, and the counting helpers the selections share.

A :class:`MagnitudeThreshold` keeps the ``kept`` largest magnitudes among
``total`` (over one tensor or a whole model), ties at the threshold broken by
position; a :class:`TensorSelection` is one tensor's in a form any block of
its entries applies alone. They are found by
:mod:`~modelfuse.merge.methods.magnitude_selection` (one tensor) and
:mod:`~modelfuse.merge.methods.global_top_k` (a whole model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

__all__ = [
    "HIGH_BINS",
    "LOW_BINS",
    "Chunks",
    "MagnitudeThreshold",
    "TensorSelection",
    "check_magnitudes",
    "count_at_or_above",
    "count_ones",
    "kept_count",
    "magnitude_bits",
    "position_of_one",
    "scratch_buffer",
]

HIGH_BINS = 1 << 15  # top 16 bits of a non-negative float32 (sign bit is 0)
LOW_BINS = 1 << 16


def kept_count(density: float, n: int) -> int:
    """How many of ``n`` entries a magnitude trim to ``density`` keeps: ``int(density * n)``,
    and at least one when ``density > 0`` (mergekit 0.1.5's count).

    Examples
    --------
    >>> kept_count(0.5, 5), kept_count(1e-9, 1000), kept_count(0.0, 1000)
    (2, 1, 0)
    """
    if density <= 0 or n <= 0:
        return 0
    return max(1, int(density * n))


def check_magnitudes(values: torch.Tensor) -> torch.Tensor:
    """The values as a flat, contiguous float32 tensor outside autograd (a selection
    reads them, often through numpy)."""
    if values.dtype != torch.float32:
        values = values.to(torch.float32)
    return values.detach().reshape(-1).contiguous()


def magnitude_bits(magnitudes: torch.Tensor) -> torch.Tensor:
    return check_magnitudes(magnitudes).view(torch.int32)


class MagnitudeThreshold:
    """A selection of the ``kept`` largest magnitudes among ``total``, over one tensor or a model.

    Attributes
    ----------
    value : float
        The ``kept``-th largest magnitude (``inf`` when nothing is kept, ``-inf``
        when everything is).
    kept, total : int
        Entries kept, and entries looked at.
    tie_quota : dict name -> int, or None
        When not every entry equal to ``value`` fits, how many of them each
        tensor keeps, first in index order (tensors not listed keep none);
        None keeps them all.

    Examples
    --------
    >>> selection = MagnitudeThreshold(2.0, kept=2, total=4, tie_quota={"w": 1})
    >>> selection.mask(torch.tensor([2.0, 3.0, 2.0, 1.0]), "w")
    tensor([ True,  True, False, False])
    """

    __slots__ = ("kept", "tie_quota", "total", "value")

    def __init__(
        self, value: float, kept: int, total: int, tie_quota: Mapping[str, int] | None = None
    ) -> None:
        self.value = float(value)
        self.kept = int(kept)
        self.total = int(total)
        self.tie_quota = None if tie_quota is None else dict(tie_quota)

    def __repr__(self) -> str:
        return (
            f"MagnitudeThreshold(value={self.value!r}, kept={self.kept}, total={self.total}, "
            f"tie_quota={self.tie_quota!r})"
        )

    def masker(self, name: str = "", dtype: torch.dtype = torch.bool) -> Callable[..., torch.Tensor]:
        """A function masking the chunks of tensor ``name``, given in index order.

        Each call takes the magnitudes of the next chunk and returns a mask of
        ``dtype``: bools, or with ``torch.float32`` 0/1 floats (compared into
        floats: several times faster than bools converted), written into
        ``out`` when given (which may be the magnitudes themselves).
        """
        value = self.value
        quota = None if self.tie_quota is None else [self.tie_quota.get(name, 0)]
        if dtype == torch.bool:

            def mask(magnitudes: torch.Tensor) -> torch.Tensor:
                if quota is None:
                    return magnitudes >= value
                kept = magnitudes > value
                if quota[0] > 0:
                    positions = (magnitudes.reshape(-1) == value).nonzero().view(-1)[: quota[0]]
                    kept.view(-1)[positions] = True
                    quota[0] -= positions.numel()
                return kept

            return mask

        scratch: dict[str, torch.Tensor] = {}

        def float_mask(magnitudes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            kept = torch.empty(magnitudes.shape, dtype=dtype) if out is None else out
            if quota is None:
                return torch.ge(magnitudes, value, out=kept)
            ties = None
            if quota[0] > 0:  # found before the magnitudes may be overwritten
                flat = magnitudes.reshape(-1)
                ties = torch.eq(flat, value, out=scratch_buffer(scratch, "ties", flat.numel()))
            torch.gt(magnitudes, value, out=kept)
            if ties is not None:
                count = count_ones(ties)
                if count <= quota[0]:
                    kept.view(-1).add_(ties)
                    quota[0] -= count
                else:  # the ties up to the quota-th one
                    last = position_of_one(ties, quota[0]) + 1
                    kept.view(-1)[:last].add_(ties[:last])
                    quota[0] = 0
            return kept

        return float_mask

    def selector(self, name: str = "") -> Callable[..., torch.Tensor]:
        """A function zeroing the unselected entries of the chunks of tensor ``name``.

        ``select(values, out=None)`` takes the next chunk of signed values
        (selected by magnitude) and returns the selection, written into ``out``
        when given (else a new tensor); the chunks must come in index order.
        """
        value = self.value
        quota = None if self.tie_quota is None else [self.tie_quota.get(name, 0)]
        # |x| >= value  <=>  |x| > the float32 just below value (value > 0).
        below = float(torch.nextafter(torch.tensor(value), torch.tensor(0.0))) if value > 0 else 0.0

        def shrink(values: torch.Tensor, limit: float, out: torch.Tensor | None) -> torch.Tensor:
            if out is None:
                return torch.nn.functional.hardshrink(values, limit)
            return torch.ops.aten.hardshrink.out(values, limit, out=out)

        scratch: dict[str, torch.Tensor] = {}

        def select(values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            if value == float("inf"):
                return torch.zeros_like(values) if out is None else out.zero_()
            if value == float("-inf") or value <= 0.0:
                return values.clone() if out is None else out.copy_(values)
            if quota is None:
                return shrink(values, below, out)
            if quota[0] <= 0:
                return shrink(values, value, out)
            # ties counted as floats in reused buffers (much faster than bool tensors)
            flat = values.reshape(-1)
            ties = torch.abs(flat, out=scratch_buffer(scratch, "abs", flat.numel()))
            ties = torch.eq(ties, value, out=ties)
            count = count_ones(ties)
            if count <= quota[0]:
                quota[0] -= count
                return shrink(values, below, out)
            kept = shrink(values, value, out)
            positions = ties.nonzero().view(-1)[: quota[0]]
            kept.view(-1)[positions] = flat[positions]
            quota[0] = 0
            return kept

        return select

    def mask(self, magnitudes: torch.Tensor, name: str = "") -> torch.Tensor:
        """The entries of the whole tensor ``name`` this selection keeps."""
        return self.masker(name)(check_magnitudes(magnitudes).reshape(magnitudes.shape))


Chunks = Callable[[], Iterable[torch.Tensor]]
"""Calling it yields the magnitudes of one tensor chunk by chunk, in index order."""


class TensorSelection:
    """One tensor's selection in a form any block of its entries can apply alone.

    An entry is kept when its magnitude exceeds ``value``, or equals it and its
    flat index is below ``cutoff`` (every such entry when ``cutoff`` is None).

    Examples
    --------
    >>> values = torch.tensor([2.0, 3.0, 2.0, 1.0])
    >>> from modelfuse.merge.methods.magnitude_selection import select_top_k
    >>> selection = TensorSelection.of(select_top_k(lambda: [values], 2, 4), lambda: [values])
    >>> selection
    TensorSelection(value=2.0, cutoff=1)
    >>> selection.within(2, 2, lambda: [values[2:]]).mask(values[2:])  # entries 2 and 3
    tensor([False, False])
    """

    __slots__ = ("cutoff", "value")

    def __init__(self, value: float, cutoff: int | None = None) -> None:
        self.value = float(value)
        self.cutoff = None if cutoff is None else int(cutoff)

    def __repr__(self) -> str:
        return f"TensorSelection(value={self.value!r}, cutoff={self.cutoff!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorSelection):
            return NotImplemented
        return (self.value, self.cutoff) == (other.value, other.cutoff)

    def __hash__(self) -> int:
        return hash((self.value, self.cutoff))

    @classmethod
    def of(cls, threshold: MagnitudeThreshold, chunks: Chunks) -> TensorSelection:
        """The selection of a whole tensor, from its :func:`~modelfuse.merge.methods.magnitude_selection.select_top_k` threshold.

        ``chunks`` yields the tensor's magnitudes; it is read only when some
        entries equal to the threshold are kept and others not.
        """
        quota = None if threshold.tie_quota is None else threshold.tie_quota.get("", 0)
        if quota is None:
            return cls(threshold.value)
        if quota <= 0:
            return cls(threshold.value, 0)
        seen = 0
        scratch: dict[str, torch.Tensor] = {}
        for chunk in chunks():
            flat = chunk.reshape(-1)
            # counted as floats (fast); positions only in the chunk where the quota runs out
            equal = torch.eq(flat, threshold.value, out=scratch_buffer(scratch, "eq", flat.numel()))
            count = count_ones(equal)
            if count >= quota:
                return cls(threshold.value, seen + position_of_one(equal, quota) + 1)
            quota -= count
            seen += flat.numel()
        return cls(threshold.value, seen)

    def within(self, offset: int, n: int, chunks: Chunks) -> MagnitudeThreshold:
        """The selection of the ``n`` entries starting at flat index ``offset``.

        ``chunks`` yields their magnitudes; it is read only when the cutoff
        falls inside them and entries equal to the threshold are there.
        """
        if self.cutoff is None or self.cutoff >= offset + n:
            return MagnitudeThreshold(self.value, 0, n)
        if self.cutoff <= offset:
            return MagnitudeThreshold(self.value, 0, n, {"": 0})
        limit, quota, seen = self.cutoff - offset, 0, 0
        scratch: dict[str, torch.Tensor] = {}
        for chunk in chunks():
            flat = chunk.reshape(-1)
            part = flat[: max(0, limit - seen)]
            quota += count_ones(
                torch.eq(part, self.value, out=scratch_buffer(scratch, "eq", part.numel()))
            )
            seen += flat.numel()
            if seen >= limit:
                break
        return MagnitudeThreshold(self.value, 0, n, {"": quota})


def scratch_buffer(
    cache: dict[str, torch.Tensor], key: str, length: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A buffer of at least ``length`` entries, reused from chunk to chunk."""
    buffer = cache.get(key)
    if buffer is None or buffer.numel() < length or buffer.dtype != dtype:
        buffer = cache[key] = torch.empty(length, dtype=dtype)
    return buffer[:length]


def count_ones(flags: torch.Tensor) -> int:
    """How many of the 0/1 float ``flags`` are 1 (a float sum is exact below 2**24)."""
    if flags.numel() < (1 << 24):
        return int(flags.sum())
    return int(flags.sum(dtype=torch.float64))


_BLOCK = 4096  # entries per block summed by position_of_one


def position_of_one(flags: torch.Tensor, q: int) -> int:
    """The flat index of the ``q``-th 1 (from 1) among the 0/1 float ``flags``, which hold at
    least ``q`` ones.

    Blocks of entries are counted first, so only the block holding it is searched: on a
    long tensor several times faster than listing every 1 with ``nonzero``.

    Examples
    --------
    >>> position_of_one(torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0]), 3)
    4
    """
    flat = flags.reshape(-1)
    whole = flat.numel() - flat.numel() % _BLOCK
    if whole >= 4 * _BLOCK:
        # float sums of at most 4096 ones are exact
        totals = np.cumsum(flat[:whole].view(-1, _BLOCK).sum(1).numpy().astype(np.int64))
        block = int(np.searchsorted(totals, q))  # the first block whose running total reaches q
        before = int(totals[block - 1]) if block > 0 else 0
        start = block * _BLOCK
        rest = flat[start : start + _BLOCK] if block < len(totals) else flat[whole:]
        return start + int(rest.nonzero()[q - before - 1])
    return int(flat.nonzero()[q - 1])


def count_at_or_above(counts: torch.Tensor) -> torch.Tensor:
    """``out[b]`` = how many are in bin ``b`` or above."""
    return torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])
