"""Random drop masks that any block of a tensor draws alone: DARE's and DELLA's.

DARE keeps each entry with probability ``density``; DELLA with a probability
rising with the entry's magnitude rank in its row (:func:`della_probabilities`),
drawn without ranking the row (:func:`della_keep`).
The draws of flat entry ``e`` come from a generator seeded by
``s + e // RANDOM_CHUNK`` (:func:`uniform_draws`), so a block of rows finds its
own draws without drawing the ones before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "DELLA_ONE_ENTRY",
    "RANDOM_CHUNK",
    "della_groups",
    "della_keep",
    "della_probabilities",
    "uniform_draws",
    "unpack_mask",
]


RANDOM_CHUNK = 1 << 18
"""Flat entries drawing from one generator in DARE's drop masks (see :func:`uniform_draws`)."""


DELLA_ONE_ENTRY = 0.5
"""The rank position given to an entry ranked alone (a row of one entry): its keep
probability is then ``density`` (mergekit 0.1.5 divides 0 by 0 there and fails)."""


def della_groups(shape: Sequence[int]) -> tuple[int, int]:
    """``(length, stride)`` of the groups within which DELLA ranks magnitudes.

    As mergekit's ``della_magprune``: along the second dimension (each row of a
    matrix; for more dimensions, each ``tensor[i, :, j, ...]``), or the whole
    tensor when it has fewer than two dimensions. In the flat layout a group's
    entries are ``stride`` apart and ``length * stride`` entries hold whole groups.

    Examples
    --------
    >>> della_groups((4, 6)), della_groups((10,)), della_groups((2, 3, 5))
    ((6, 1), (10, 1), (3, 5))
    """
    if len(shape) < 2:
        n = 1
        for size in shape:
            n *= int(size)
        return n, 1
    stride = 1
    for size in shape[2:]:
        stride *= int(size)
    return int(shape[1]), stride


def della_probabilities(
    magnitudes: torch.Tensor, density: float, epsilon: float, groups: tuple[int, int]
) -> torch.Tensor:
    r"""DELLA's keep probabilities: linear in each entry's magnitude rank within its group.

    In a group of :math:`m` entries, the entry of rank :math:`r` (0 for the
    smallest magnitude; equal magnitudes ranked by position) is kept with
    probability :math:`p = (d - \epsilon) + 2\epsilon\, r / (m - 1)`, from
    :math:`d - \epsilon` to :math:`d + \epsilon` (:data:`DELLA_ONE_ENTRY` in
    place of :math:`r / (m - 1)` when :math:`m = 1`), in float32 as mergekit
    0.1.5 computes them. ``magnitudes`` holds whole groups (a multiple of
    ``length * stride`` flat entries, see :func:`della_groups`). Returns a new
    float32 tensor of the same shape.

    The ``m`` probabilities are computed once per group length and handed to
    each entry by its rank, which one sort per group finds: the float32 bit
    patterns of the magnitudes (ordered as the values) widened to integers with
    the entry's position in the low bits, so that a plain sort orders equal
    magnitudes by position and also says where each sorted entry came from.

    Examples
    --------
    >>> della_probabilities(torch.tensor([3.0, 1.0, 2.0]), 0.5, 0.1, (3, 1))
    tensor([0.6000, 0.4000, 0.5000])
    """
    length, stride = groups
    view = magnitudes.reshape(-1, length, stride)
    if length == 1:
        position = torch.full(view.shape, DELLA_ONE_ENTRY, dtype=torch.float32)
        probabilities = position.mul_(2).mul_(epsilon).add_(density - epsilon)
        return probabilities.reshape(magnitudes.shape)
    # p for each rank: the same float32 operations as on every entry, done once per rank
    table = torch.arange(length, dtype=torch.float32).div_(length - 1)
    table = table.mul_(2).mul_(epsilon).add_(density - epsilon)
    rows = view.transpose(1, 2) if stride > 1 else view
    order = _rank_order(rows.reshape(-1, length))
    probabilities = torch.empty(order.shape, dtype=torch.float32)
    probabilities.scatter_(1, order, table.expand(order.shape))
    if stride > 1:
        probabilities = probabilities.view(-1, stride, length).transpose(1, 2)
    return probabilities.reshape(magnitudes.shape)


def della_keep(
    magnitudes: torch.Tensor,
    draws: torch.Tensor,
    density: float,
    epsilon: float,
    groups: tuple[int, int],
) -> torch.Tensor:
    r"""DELLA's keep decisions, each entry kept with its :func:`della_probabilities`, drawn
    without ranking: 1.0 for a kept entry, 0.0 for a dropped one, written into ``draws``.

    ``draws`` holds one uniform draw :math:`u \in [0, 1)` per entry (from
    :func:`uniform_draws`); with :math:`v = 1 - u`, :math:`a = d - \epsilon` and
    :math:`b = d + \epsilon`, an entry is kept when :math:`v \le a`, dropped when
    :math:`v > b`, and otherwise compared with one other entry of its group, the
    one picked by where :math:`v` falls in :math:`(a, b]`: index
    :math:`j = \lceil (m - 1)(v - a) / (b - a) \rceil - 1` among the :math:`m - 1`
    others in position order. The entry is kept when that other entry ranks below
    it (smaller magnitude, or equal and earlier). As the other entry is uniform
    among the :math:`m - 1`, the entry of rank :math:`r` is kept with probability
    :math:`a + (b - a)\, r / (m - 1)`, exactly the probability of
    :func:`della_probabilities`, and independently of the other entries: the same
    distribution of masks as a Bernoulli draw per entry after a sort of every
    group, for the cost of one gather. The only difference is the resolution of
    a float32 draw: each of the :math:`m - 1` picks has probability
    :math:`(b - a) / (m - 1)` to within :math:`2^{-24}`. Groups of one entry are
    kept with probability :math:`d` (:data:`DELLA_ONE_ENTRY`); a negative
    :math:`\epsilon` compares the other way (the entry is kept when the other
    one ranks above it), as the probabilities then fall with the rank.

    Examples
    --------
    >>> ramp = torch.arange(1.0, 11.0).repeat(50000, 1)  # rank = column
    >>> keep = della_keep(ramp, torch.rand(ramp.shape), 0.5, 0.4, (10, 1))
    >>> rates = keep.mean(0)  # 0.1 for the smallest, 0.9 for the largest
    >>> bool((rates - torch.linspace(0.1, 0.9, 10)).abs().max() < 0.02)
    True
    """
    length, stride = groups
    if length == 1 or epsilon == 0:  # one probability for every entry
        p = torch.tensor(DELLA_ONE_ENTRY, dtype=torch.float32).mul(2).mul(epsilon)
        return draws.add_(p.add(density - epsilon)).floor_()
    # a negative epsilon keeps the smaller magnitudes more often: the ranks run the other way
    low, high = density - abs(epsilon), density + abs(epsilon)
    keys = _magnitude_keys(magnitudes).view(-1, length, stride)
    # where 1 - u falls in (low, high]: at most 0 below it (kept), above 1 beyond it (dropped)
    band = torch.rsub(draws.view(keys.shape), 1.0).sub_(low).div_(high - low)
    kept_anyway = band <= 0
    in_band = band <= 1
    pick = band.mul_(length - 1).ceil_().sub_(1).clamp_(0, length - 2).to(torch.int64)
    earlier = pick < torch.arange(length).view(1, length, 1)
    pick += ~earlier  # the m - 1 others: positions from 0 to m - 1 without this one
    other = torch.gather(keys, 1, pick)
    del pick
    if epsilon > 0:  # the other entry ranks below this one
        below = torch.lt(other, keys).logical_or_(torch.eq(other, keys).logical_and_(earlier))
    else:  # ... above it
        below = torch.gt(other, keys).logical_or_(torch.eq(other, keys).logical_and_(~earlier))
    keep = below.logical_and_(in_band).logical_or_(kept_anyway)
    return draws.copy_(keep.view(draws.shape))


def _magnitude_keys(magnitudes: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the (non-negative) magnitudes, NaNs above everything and
    equal among themselves."""
    bits = magnitudes.to(torch.float32).contiguous().view(torch.int32)
    return bits.bitwise_and(0x7FFFFFFF).clamp_(max=_NAN_BITS)


_NAN_BITS = 0x7F800001
"""Every NaN's bit pattern (sign bit cleared) is clamped to this, just above inf's: NaNs
rank above every number and among themselves by position, as torch's stable sort ranks them."""


def _rank_order(groups: torch.Tensor) -> torch.Tensor:
    """For each row of the 2-D ``groups`` (non-negative values), the positions of its
    entries from the smallest to the largest, equal values by position: a stable argsort
    along the rows, as int64."""
    length = groups.shape[1]
    shift = max(1, (length - 1).bit_length())
    if shift > 32:  # positions do not fit beside the 31 bits of a magnitude
        return torch.argsort(groups, dim=1, stable=True)
    keys = _magnitude_keys(groups).to(torch.int64).numpy()
    np.left_shift(keys, shift, out=keys)
    np.bitwise_or(keys, np.arange(length, dtype=np.int64), out=keys)
    keys.sort(axis=1)
    np.bitwise_and(keys, (1 << shift) - 1, out=keys)
    return torch.from_numpy(keys)


def uniform_draws(seed: int, start: int, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` with the uniform draws of flat entries ``start ...`` of a stream.

    Entry ``e`` of the stream is draw ``e % RANDOM_CHUNK`` of a generator seeded
    by ``seed + e // RANDOM_CHUNK``, so any block of entries is found without
    drawing the ones before it, and the stream does not depend on how a tensor
    is split.

    Examples
    --------
    >>> whole = uniform_draws(7, 0, torch.empty(10))
    >>> torch.equal(uniform_draws(7, 4, torch.empty(6)), whole[4:])
    True
    """
    flat = out.reshape(-1)
    length, done = flat.numel(), 0
    while done < length:
        chunk, position = divmod(start + done, RANDOM_CHUNK)
        take = min(length - done, RANDOM_CHUNK - position)
        generator = torch.Generator().manual_seed(seed + chunk)
        if position == 0:
            torch.rand(take, generator=generator, out=flat[done : done + take])
        else:
            flat[done : done + take] = torch.rand(position + take, generator=generator)[position:]
        done += take
    return out


def unpack_mask(mask: np.ndarray, start: int, out: torch.Tensor) -> torch.Tensor:
    """Entries ``start ... start + out.numel()`` of a packed 0/1 mask, as floats in ``out``."""
    length = out.numel()
    first = start // 8
    bits = np.unpackbits(mask[first : (start + length + 7) // 8])
    skip = start - 8 * first
    return out.copy_(torch.from_numpy(bits[skip : skip + length]).view(out.shape))
