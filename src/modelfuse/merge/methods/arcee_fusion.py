"""Arcee Fusion: the other model's value where its change is an outlier of importance (mergekit's ``arcee_fusion``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import MethodParameters

__all__ = [
    "SAMPLE_SIZE",
    "ArceeFusionParameters",
    "FusionThreshold",
    "arcee_fusion",
    "fusion_threshold",
    "order_statistics",
    "row_divergences",
]

SAMPLE_SIZE = 1_000_000
"""Above this many entries the quantiles are those of this many positions drawn at random
(with replacement), as mergekit draws them; at or below it they are exact."""

SOFTMAX_EPS = 1e-8
"""Added to both softmaxes before the KL divergence (mergekit's constant)."""

_CHUNK = 1 << 18
"""Entries processed at once (whole rows); temporaries stay a few chunks."""


class ArceeFusionParameters(MethodParameters):
    """Parameters of :func:`arcee_fusion` (mergekit's ``arcee_fusion`` has none)."""

    random_seed: int = Field(
        0,
        description="seed of the 1,000,000 positions sampled for the importance quantiles of "
        "tensors with more entries (mergekit draws them unseeded); each tensor draws from a "
        "generator seeded by this and its name",
    )


@dataclass(frozen=True)
class FusionThreshold:
    """What :func:`arcee_fusion` needs of a whole tensor before merging a block of its rows.

    Attributes
    ----------
    value : Tensor
        The importance threshold, a float32 scalar.
    divergences : Tensor
        float32, the KL divergence of each row of the tensor's 2-D view
        ``[-1, shape[-1]]`` (one row for a 1-D tensor).
    """

    value: torch.Tensor
    divergences: torch.Tensor


def _check(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The other model's tensor and the base's, once the inputs are checked."""
    if base is None:
        raise ConfigError("arcee_fusion needs a base model; set base_model")
    if len(tensors) != 1:
        raise ConfigError(
            "arcee_fusion merges the base model with exactly one other model; "
            f"got {len(tensors)} other models"
        )
    if tensors[0].shape != base.shape:
        raise ConfigError(
            f"arcee_fusion: the model's tensor has shape {tuple(tensors[0].shape)} and the "
            f"base's {tuple(base.shape)}; they must be equal"
        )
    return tensors[0], base


def _matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-D view whose rows the softmax runs over (the last dimension)."""
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    return tensor.reshape(-1, tensor.shape[-1])


def _row_chunks(
    tensor: torch.Tensor, base: torch.Tensor
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """``(rows, x, b)`` in float32, a few whole rows at a time."""
    mx, mb = _matrix(tensor), _matrix(base)
    rows, columns = mx.shape
    step = max(1, _CHUNK // max(columns, 1))
    for start in range(0, rows, step):
        index = slice(start, min(rows, start + step))
        yield index, mx[index].to(torch.float32), mb[index].to(torch.float32)


def row_divergences(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    r"""float32 ``[rows]``: :math:`\mathrm{KL}(p \| q) = \sum_j p_j \log(p_j / q_j)` per row,
    with :math:`p = \operatorname{softmax}(x) + 10^{-8}` and
    :math:`q = \operatorname{softmax}(b) + 10^{-8}` over the last dimension.

    Examples
    --------
    >>> row_divergences(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.zeros(2, 2))
    tensor([0.0000, 0.1109])
    """
    rows = _matrix(tensor).shape[0]
    out = torch.empty(rows, dtype=torch.float32)
    for index, x, b in _row_chunks(tensor, base):
        p = torch.softmax(x, dim=-1).add_(SOFTMAX_EPS)
        q = torch.softmax(b, dim=-1).add_(SOFTMAX_EPS)
        torch.sum(p * torch.log(p / q), dim=-1, out=out[index])
    return out


def _quantile_threshold(values: torch.Tensor) -> torch.Tensor:
    """median + 1.5 (q3 - q1), each quantile ``sorted[int(q (n - 1))]``, in float32."""
    flat = values.reshape(-1).to(torch.float32).numpy()
    last = flat.size - 1
    # sorted[int(q * last)] for q = 1/4, 1/2, 3/4, the index exact in integers (mergekit's
    # float32 product is exact too below 2**22)
    ranks = [last // 4, last // 2, 3 * last // 4]
    q1, median, q3 = (torch.tensor(v) for v in order_statistics(flat, ranks))
    return median + 1.5 * (q3 - q1)


def order_statistics(values: np.ndarray, ranks: Sequence[int]) -> list[np.float32]:
    """``np.sort(values)[r]`` for each rank ``r`` of a float32 array (NaN last, as a sort
    puts them), without sorting: one histogram of the top 16 bits of order-preserving
    integer keys, then a selection among the values of the bucket holding each rank.

    Examples
    --------
    >>> values = np.array([3.0, -1.0, np.nan, 0.5, 2.0], dtype=np.float32)
    >>> [float(v) for v in order_statistics(values, [0, 2, 4])]
    [-1.0, 2.0, nan]
    """
    bits = values.view(np.uint32)
    # keys ordered as the floats: negatives reversed below the positives, every NaN last
    keys = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))
    keys[np.isnan(values)] = np.uint32(0xFFFFFFFF)
    buckets = (keys >> 16).astype(np.int64)
    ends = np.cumsum(np.bincount(buckets, minlength=1 << 16))
    out = []
    for rank in ranks:
        bucket = int(np.searchsorted(ends, rank, side="right"))
        before = int(ends[bucket - 1]) if bucket else 0
        inside = values[buckets == bucket]
        out.append(np.partition(inside, rank - before)[rank - before])
    return out


def fusion_threshold(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    random_seed: int = 0,
    name: str = "",
) -> FusionThreshold:
    r"""The reduction of :func:`arcee_fusion`: the importance threshold of the whole tensor
    and the KL divergence of each of its rows.

    The threshold is :math:`\mathrm{median} + 1.5\,(q_3 - q_1)` of the importance
    :math:`|x - b| \cdot \mathrm{KL}_{\mathrm{row}}`, each quantile ``q`` the
    entry ``int(q (n - 1))`` of the sorted values: of every entry when the
    tensor has at most :data:`SAMPLE_SIZE`, else of :data:`SAMPLE_SIZE`
    positions drawn with replacement from a generator seeded by
    ``random_seed`` and the tensor's ``name`` (the same positions however the
    tensor is split into blocks).

    Examples
    --------
    >>> base = torch.zeros(2, 4)
    >>> other = torch.tensor([[0.0, 0.1, 0.0, 2.0], [0.0, 0.0, 0.0, 0.1]])
    >>> fusion_threshold([other], base)  # importance: 0 (5 entries), 1e-4, 0.045, 0.91
    FusionThreshold(value=tensor(0.0001), divergences=tensor([0.4542, 0.0010]))
    """
    other, base = _check(tensors, base)
    if other.numel() == 0:
        return FusionThreshold(torch.tensor(0.0), torch.zeros(0))
    divergences = row_divergences(other, base)
    columns = _matrix(other).shape[1]
    size = other.numel()
    if size <= SAMPLE_SIZE:
        parts = []
        for index, x, b in _row_chunks(other, base):
            parts.append((x - b).abs_().mul_(divergences[index].unsqueeze(1)).reshape(-1))
        values = torch.cat(parts)
    else:
        from modelfuse.merge.execute import tensor_generator

        generator = tensor_generator(random_seed, name)
        positions = torch.randint(size, (SAMPLE_SIZE,), generator=generator)
        # index_select: a few times faster than indexing for a million scattered reads
        x = torch.index_select(other.reshape(-1), 0, positions).to(torch.float32)
        b = torch.index_select(base.reshape(-1), 0, positions).to(torch.float32)
        rows = torch.index_select(divergences, 0, positions.div_(columns, rounding_mode="floor"))
        values = (x - b).abs_().mul_(rows)
    return FusionThreshold(_quantile_threshold(values), divergences)


def arcee_fusion(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    random_seed: int = 0,
    name: str = "",
    offset: int = 0,
    threshold: FusionThreshold | None = None,
) -> torch.Tensor:
    r"""Arcee Fusion: take the other model's value where its change is an outlier of importance.

    With :math:`b` the base model's tensor and :math:`x` the other model's,
    the importance of each entry is

    .. math::

        I = |x - b| \cdot \mathrm{KL}\big(\operatorname{softmax}(x) + 10^{-8}
        \,\big\|\, \operatorname{softmax}(b) + 10^{-8}\big),

    the KL divergence taken per row (softmax over the last dimension; a 1-D
    tensor is one row). With :math:`T = \mathrm{median}(I) + 1.5\,(q_3(I) -
    q_1(I))` (Tukey's upper fence, see :func:`fusion_threshold`), the result
    is :math:`b + (x - b) \cdot [I \ge T]`, in float32.

    The quantiles are exact for tensors of at most :data:`SAMPLE_SIZE`
    entries; larger tensors take them from a sample of that many positions
    seeded by ``random_seed`` and the tensor's name, where mergekit draws an
    unseeded sample (so neither tool reproduces the other's threshold there).
    The threshold and the row divergences are the method's reduction, so large
    tensors merge in blocks of rows.

    Parameters
    ----------
    tensors : sequence of Tensor
        Exactly one tensor: the other model's. Not modified.
    base : Tensor
        The base model's tensor. Not modified.
    random_seed : int, default 0
        Seed of the sampled positions (tensors above :data:`SAMPLE_SIZE`).
    name : str
        The tensor's name (seeds its sample).
    offset : int, default 0
        Flat index of the inputs' first entry in the whole tensor (row blocks).
    threshold : FusionThreshold, optional
        :func:`fusion_threshold` of the whole tensor, when the inputs are a
        block of rows of it; computed from the inputs when not given.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Arcee AI, "Arcee Fusion" (mergekit's ``arcee_fusion``), https://arcee.ai and
    https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md ;
    Tukey, *Exploratory Data Analysis*, 1977 (the 1.5 IQR fence).

    Examples
    --------
    >>> base = torch.zeros(2, 4)
    >>> other = torch.tensor([[0.0, 0.1, 0.0, 2.0], [0.0, 0.0, 0.0, 0.1]])
    >>> arcee_fusion([other], base)  # the change in the nearly unchanged row is not taken
    tensor([[0.0000, 0.1000, 0.0000, 2.0000],
            [0.0000, 0.0000, 0.0000, 0.0000]])
    """
    other, base = _check(tensors, base)
    if other.numel() == 0:
        return torch.empty(other.shape, dtype=torch.float32)
    if threshold is None:
        threshold = fusion_threshold(tensors, base, random_seed=random_seed, name=name)
    value = threshold.value.to(torch.float32)
    divergences = threshold.divergences
    out = torch.empty(other.shape, dtype=torch.float32)
    matrix = _matrix(out)
    if other.dim() <= 1:  # one row, perhaps a block of it: its divergence is the whole row's
        first = 0
    else:
        first = offset // other.shape[-1]
    for index, x, b in _row_chunks(other, base):
        if other.dim() <= 1:
            kl = divergences[:1].expand(x.shape[0])
        else:
            kl = divergences[first + index.start : first + index.stop]
        difference = x - b
        mask = torch.abs(difference).mul_(kl.unsqueeze(1)).ge_(value)
        # b + (x - b) * mask, as mergekit writes it
        torch.add(b, difference.mul_(mask), out=matrix[index])
    return out
