"""Random drop masks that any block of a tensor draws alone: DARE's and DELLA's.

DARE keeps each entry with probability ``density``; DELLA with a probability
rising with the entry's magnitude rank in its row (:func:`della_probabilities`),
drawn without ranking the row (:func:`della_keep`).
The draws of flat entry ``e`` come from a generator seeded by
``s + e // RANDOM_CHUNK`` (:func:`uniform_draws`), so a block of rows finds its
own draws without drawing the ones before it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from modelfuse.merge.methods.workspace import TRANSIENT, Workspace

__all__ = [
    "DELLA_ONE_ENTRY",
    "RANDOM_CHUNK",
    "della_groups",
    "della_keep",
    "della_probabilities",
    "uniform_draws",
    "uniform_words",
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
    values: torch.Tensor,
    draws: torch.Tensor,
    density: float,
    epsilon: float,
    groups: tuple[int, int],
    out: torch.Tensor | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    r"""DELLA's keep decisions, each entry kept with its :func:`della_probabilities`, drawn
    without ranking: a bool tensor of the shape of ``draws``, True for a kept entry, or
    with ``out`` (a float32 tensor of as many entries, which may be ``draws`` itself)
    0/1 floats written there, which multiply a chunk several times faster than bools.
    ``values`` may be signed: their magnitudes are ranked.

    ``draws`` holds one uniform draw :math:`u \in [0, 1)` per entry (from
    :func:`uniform_draws`), or as an int32 tensor the integers :math:`2^{24} u`
    (from :func:`uniform_words`, which saves converting them). With
    :math:`v = 1 - u`, :math:`a = d - |\epsilon|`, :math:`b = d + |\epsilon|` and :math:`m` entries in the group, the draw picks
    :math:`j = \lceil (m - 1)(v - a) / (b - a) \rceil - 1`: the entry is kept
    when :math:`j < 0` (:math:`v \le a`), dropped when :math:`j \ge m`, and
    otherwise kept when entry :math:`j` of its group (in position order, itself
    included) ranks below it: a smaller magnitude, or an equal one at an
    earlier position (itself does not). Each of the :math:`m` entries is picked
    with probability :math:`(b - a) / (m - 1)`, so the entry of rank :math:`r`
    is kept with probability :math:`a + (b - a)\, r / (m - 1)`, exactly the
    probability of :func:`della_probabilities`, and independently of the other
    entries: the distribution of masks of a Bernoulli draw per entry after a
    sort of every group, for the cost of one gather (its temporaries taken from
    ``workspace`` when given, so that chunk after chunk reuses them). The only
    difference is the resolution of a float32 draw: each pick's probability is exact to within
    :math:`2^{-24}`. A negative :math:`\epsilon` (probabilities falling with the
    rank) keeps the entry when the picked one ranks above it. Groups of one
    entry are kept with probability :math:`d` (:data:`DELLA_ONE_ENTRY`); when
    :math:`b + (b - a) / (m - 1) > 1` (short groups with :math:`b` near 1) the
    picks would need draws beyond 1, and the groups are ranked instead
    (:func:`della_probabilities`, kept when :math:`u + p \ge 1`).

    Examples
    --------
    >>> ramp = torch.arange(1.0, 11.0).repeat(50000, 1)  # rank = column
    >>> keep = della_keep(ramp, torch.rand(ramp.shape), 0.5, 0.4, (10, 1))
    >>> rates = keep.double().mean(0)  # 0.1 for the smallest, 0.9 for the largest
    >>> bool((rates - torch.linspace(0.1, 0.9, 10)).abs().max() < 0.02)
    True
    """
    length, stride = groups
    # draws as integers w stand for w * 2**-24 (exact in float32, and so are products
    # by it: w * (c * 2**-24) rounds as (w * 2**-24) * c)
    unit = 2.0**-24 if draws.dtype == torch.int32 else 1.0
    low, high = density - abs(epsilon), density + abs(epsilon)
    if length == 1 or epsilon == 0 or high + (high - low) / (length - 1) > 1:
        uniform = draws if unit == 1.0 else draws.to(torch.float32).mul_(unit)
        if length == 1 or epsilon == 0:  # one probability for every entry
            p = torch.tensor(DELLA_ONE_ENTRY, dtype=torch.float32).mul(2).mul(epsilon)
            p = p.add(density - epsilon)
        else:
            p = della_probabilities(values.abs(), density, epsilon, groups)
        return _decided(torch.add(uniform, p).ge_(1), draws, out)
    rows = values.numel() // (length * stride)
    space = workspace if workspace is not None else Workspace(0)
    exact = torch.float32 if length <= 1 << 24 else torch.float64  # holds every position
    layout = space.derived(
        ("della", rows, length, stride, exact),
        lambda: _Layout(space, rows, length, stride, exact),
    )
    layout.set_sentinels(space, epsilon > 0)
    keys = layout.keys
    # the magnitudes' bits: a NaN's key depends on its payload here (it ranks above every
    # number all the same), which changes only its own decision, and that multiplies a NaN
    bits = values.to(torch.float32).contiguous().view(torch.int32).view(keys.shape)
    torch.bitwise_and(bits, 0x7FFFFFFF, out=keys)
    # the picks go where the decisions will: the draws' own buffer when it takes them (its
    # draws are read once, entry by entry, before the picks are written over them)
    shared = (
        out is not None
        and exact == torch.float32
        and out.data_ptr() == draws.data_ptr()
        and out.numel() == draws.numel()
        and draws.element_size() == 4
        and out.dtype == torch.float32
    )
    if shared and out is not None:
        pick = out.view(keys.shape)
    else:
        pick = space.get("della pick", keys.numel(), exact).view(keys.shape)
    # column j + 1 of the padded keys: ceil((m - 1)(1 - u - a) / (b - a)), within [0, m + 1]
    scale = (length - 1) / (high - low)
    if exact == torch.float32:
        torch.mul(draws.view(keys.shape), -scale * unit, out=pick)
    else:
        pick.copy_(draws.view(keys.shape)).mul_(-scale * unit)
    pick.add_((1 - low) * scale)
    pick.ceil_().clamp_(0, length + 1)
    # keys are integers: "smaller, or equal and earlier" is "smaller than key + 1" for a
    # picked entry before this one (beyond the band, the sentinels never tie); comparisons
    # into int32 and float32 tensors: several times faster than into bools
    bound = layout.bound
    if epsilon > 0:
        torch.lt(pick, layout.column, out=bound).add_(keys)
    else:  # "larger, or equal and later"
        torch.gt(pick, layout.column, out=bound).neg_().add_(keys)
    if layout.starts is not None and layout.picked is not None:
        # the picked keys by flat position: int32 positions, far faster than gather's int64
        # (written over the picks, entry by entry, as they are converted)
        position = pick.view(torch.int32) if exact == torch.float32 else None
        if position is None:
            position = space.get("della position", keys.numel(), torch.int32).view(keys.shape)
        position.copy_(pick).add_(layout.starts)
        other = layout.picked
        torch.index_select(layout.flat, 0, position.view(-1), out=other.view(-1))
    else:
        other = torch.gather(layout.padded, 1, pick.to(torch.int64))
    if out is not None:
        keep = out.view(keys.shape)
    else:
        keep = torch.empty(keys.shape, dtype=torch.bool)
    if epsilon > 0:
        torch.lt(other, bound, out=keep)
    else:
        torch.gt(other, bound, out=keep)
    return keep.view(draws.shape)


class _Layout:
    """The views :func:`della_keep` works in for chunks of ``rows`` groups: set up once
    per workspace (:meth:`Workspace.derived`), not chunk after chunk.

    The keys sit in ``padded`` with one key column on each side: picks below the
    band land on the left one, beyond it on the right one, whose sentinel keys
    rank below (above) every entry when epsilon > 0. A gather along the last
    dimension (``stride`` 1) is far faster: then ``padded`` is 2-D and the picks
    are gathered by int32 flat positions (the row ``starts`` added to the
    columns) into ``picked``.
    """

    def __init__(
        self, space: Workspace, rows: int, length: int, stride: int, exact: torch.dtype
    ) -> None:
        size = rows * length * stride
        padded = space.get("della padded", rows * (length + 2) * stride, torch.int32)
        self.padded = padded.view(rows, length + 2, stride)
        self.keys = self.padded[:, 1:-1]
        self.bound = space.get("della bound", size, torch.int32).view(self.keys.shape)
        # each entry's column, broadcast along the rows (and the stride)
        shape = (length, 1) if stride > 1 else (length,)
        self.column = torch.arange(1, length + 1, dtype=exact).view(shape)
        self.starts: torch.Tensor | None = None
        self.picked: torch.Tensor | None = None
        if stride == 1:
            self.padded, self.keys = self.padded.view(rows, length + 2), self.keys.view(rows, length)
            self.bound = self.bound.view(rows, length)
            if self.padded.numel() < 1 << 31:
                step = length + 2
                self.starts = torch.arange(0, rows * step, step, dtype=torch.int32).view(rows, 1)
                self.picked = space.get(TRANSIENT, size, torch.int32).view(rows, length)
        self.flat = self.padded.view(-1)

    def set_sentinels(self, space: Workspace, rising: bool) -> None:
        """Write the sentinel columns for epsilon > 0 (``rising``) or < 0, unless this
        layout last wrote them for the same sign (layouts of one workspace share memory)."""
        written = space.derived("della sentinels", dict)
        if written.get("by") is self and written.get("rising") == rising:
            return
        below_all, above_all = (-1, torch.iinfo(torch.int32).max)
        if not rising:
            below_all, above_all = above_all, below_all
        self.padded[:, 0].fill_(below_all)
        self.padded[:, -1].fill_(above_all)
        written.update(by=self, rising=rising)


def _decided(kept: torch.Tensor, draws: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The 0/1 float decisions ``kept`` as :func:`della_keep` returns them."""
    if out is None:
        return kept.to(torch.bool)
    return out.view(draws.shape).copy_(kept)


def _magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered as the values' magnitudes (the sign bit cleared), NaNs above
    everything and equal among themselves."""
    bits = values.to(torch.float32).contiguous().view(torch.int32)
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

    Entry ``e`` of the stream comes from draw ``e % RANDOM_CHUNK`` of a numpy
    ``PCG64`` bit generator seeded by ``seed + e // RANDOM_CHUNK``: each 64-bit
    output gives two entries (its low 32 bits first), and an entry is its 32
    bits' top 24 times 2**-24, a float32 in [0, 1). So any block of entries is
    found without drawing the ones before it (``PCG64.advance``), and the
    stream does not depend on how a tensor is split.

    Examples
    --------
    >>> whole = uniform_draws(7, 0, torch.empty(10))
    >>> torch.equal(uniform_draws(7, 3, torch.empty(7)), whole[3:])
    True
    """
    flat = out.reshape(-1)
    for done, words in _stream_words(seed, start, flat.numel()):
        np.right_shift(words, 8, out=words)
        # integers below 2**24 and their products with 2**-24 are exact in float32 (a
        # conversion, then a product in float32: twice as fast as a mixed product)
        part = flat[done : done + words.size].copy_(torch.from_numpy(words.view(np.int32)))
        part.mul_(2.0**-24)
    return out


def uniform_words(seed: int, start: int, out: torch.Tensor) -> torch.Tensor:
    """Fill the int32 tensor ``out`` with the draws of :func:`uniform_draws` times 2**24:
    the integers ``w`` below 2**24 whose ``w * 2**-24`` are those draws.

    For the callers that scale the draws anyway (:func:`della_keep`): the
    conversion and the product by 2**-24 fold into their own product, exactly
    (a product by a power of two rounds as the unscaled one).

    Examples
    --------
    >>> words = uniform_words(7, 0, torch.empty(10, dtype=torch.int32))
    >>> torch.equal(words * 2.0**-24, uniform_draws(7, 0, torch.empty(10)))
    True
    """
    flat = out.reshape(-1)
    if flat.dtype != torch.int32 or not flat.is_contiguous():
        raise ValueError(f"uniform_words writes a contiguous int32 tensor, not {flat.dtype}")
    target = flat.numpy().view(np.uint32)
    for done, words in _stream_words(seed, start, flat.numel()):
        np.right_shift(words, 8, out=target[done : done + words.size])
    return out


def _stream_words(seed: int, start: int, length: int) -> Iterator[tuple[int, np.ndarray]]:
    """The stream's 32-bit words of flat entries ``start ... start + length``, in pieces
    that each come from one generator: ``(offset within the entries, uint32 words)``."""
    done = 0
    while done < length:
        chunk, position = divmod(start + done, RANDOM_CHUNK)
        take = min(length - done, RANDOM_CHUNK - position)
        bits = np.random.PCG64(seed + chunk)
        first = position // 2  # 64-bit outputs before the first one needed
        if first:
            bits.advance(first)
        words = bits.random_raw((position + take + 1) // 2 - first).view(np.uint32)
        yield done, words[position - 2 * first : position - 2 * first + take]
        done += take


def unpack_mask(mask: np.ndarray, start: int, out: torch.Tensor) -> torch.Tensor:
    """Entries ``start ... start + out.numel()`` of a packed 0/1 mask, as floats in ``out``."""
    length = out.numel()
    first = start // 8
    bits = np.unpackbits(mask[first : (start + length + 7) // 8])
    skip = start - 8 * first
    return out.copy_(torch.from_numpy(bits[skip : skip + length]).view(out.shape))
