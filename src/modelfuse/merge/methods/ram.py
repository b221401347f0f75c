"""RAM: Reinforced Agent Merging, and its tensor-local variant (mergekit's ``ram``, ``ramplus_tl``).

Both are settings of :func:`reinforced_agent_merge`: an entry changed by one
model only keeps that model's change whole, an entry changed by several takes
their mean. ``ramplus_tl`` also scales each model's unique entries up by how
much of its change the tensor shares with other models, a whole-tensor count
(:func:`ram_counts`) that the engine sums over blocks of rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import MethodParameters

__all__ = [
    "HOLD_BYTES",
    "RamParameters",
    "RamPlusParameters",
    "ram",
    "ram_counts",
    "ram_scales",
    "ramplus_tl",
    "reinforced_agent_merge",
]

_CHUNK = 1 << 18
"""Entries processed at once; temporaries stay a few chunks whatever the tensor size."""

HOLD_BYTES = 64 * 1024 * 1024
"""``ramplus_tl`` merging a whole tensor keeps the chunks its count computed (task vectors,
masks and counts) for the merge when they take at most this; else it computes them again."""


class RamParameters(MethodParameters):
    """Parameters of :func:`ram` (mergekit's ``ram``)."""

    epsilon: float = Field(
        1e-5,
        ge=0.0,
        description="a task-vector entry counts as changed when its magnitude exceeds epsilon",
    )


class RamPlusParameters(RamParameters):
    """Parameters of :func:`ramplus_tl` (mergekit's ``ramplus_tl``)."""

    r: float = Field(
        0.1,
        description="strength of the rescaling: a model's unique entries are multiplied by "
        "1 + r * clamp(shared / unique, 0, alpha)",
    )
    alpha: float = Field(
        0.2,
        ge=0.0,
        description="largest shared-to-unique ratio counted in the rescaling",
    )


def _check(tensors: Sequence[torch.Tensor], base: torch.Tensor | None, method: str) -> torch.Tensor:
    """The base, once the inputs are checked."""
    if base is None:
        raise ConfigError(f"{method} needs a base model; set base_model")
    if not tensors:
        raise ConfigError(f"{method}: no models besides the base; give at least one")
    for tensor in tensors:
        if tensor.shape != base.shape:
            raise ConfigError(
                f"{method}: a model's tensor has shape {tuple(tensor.shape)} and the base's "
                f"{tuple(base.shape)}; they must be equal"
            )
    return base


def _chunks(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float
) -> Iterator[tuple[slice, list[torch.Tensor], list[torch.Tensor], torch.Tensor]]:
    """``(index, task vectors, masks, counts)`` chunk by chunk, in float32: the task vectors
    ``x_i - b``, the masks ``|tau_i| > epsilon`` and how many models changed each entry.

    The masks are 0/1 floats and the counts float integers: comparisons into float32
    and float arithmetic are several times faster than into and with bools, and every
    count (below 2**24) is exact.
    """
    flat_base = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    size = flat_base.numel()
    for start in range(0, size, _CHUNK):
        index = slice(start, min(size, start + _CHUNK))
        b = flat_base[index].to(torch.float32)
        taus = [flat[index].to(torch.float32) - b for flat in flats]
        masks = []
        for tau in taus:
            magnitude = tau.abs()
            masks.append(torch.gt(magnitude, epsilon, out=magnitude))
        counts = masks[0].clone()
        for mask in masks[1:]:
            counts.add_(mask)
        yield index, taus, masks, counts


def ram_counts(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, *, epsilon: float = 1e-5
) -> torch.Tensor:
    r"""``[n, 2]`` int64: per model, its changed entries shared with another model and unique.

    Row i holds :math:`\#\{j: m_{ij} \wedge c_j > 1\}` and
    :math:`\#\{j: m_{ij} \wedge c_j = 1\}`, with :math:`m_{ij} = |\tau_{ij}| >
    \epsilon` and :math:`c_j = \sum_i m_{ij}`. Counts over blocks of rows add
    up to the whole tensor's, so the engine computes them block by block (the
    reduction of ``ramplus_tl``).

    Examples
    --------
    >>> base = torch.zeros(4)
    >>> a, b = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    >>> ram_counts([a, b], base)  # each shares entry 0 and changes one entry alone
    tensor([[1, 1],
            [1, 1]])
    """
    base = _check(tensors, base, "ramplus_tl")
    return _count(_chunks(tensors, base, float(epsilon)), len(tensors))


def _count(
    chunks: Iterable[tuple[slice, list[torch.Tensor], list[torch.Tensor], torch.Tensor]],
    n_models: int,
) -> torch.Tensor:
    """:func:`ram_counts` of the chunks of :func:`_chunks` (which it leaves unchanged)."""
    total = torch.zeros(n_models, 2, dtype=torch.int64)
    for _index, _taus, masks, counts in chunks:
        unique = torch.eq(counts, 1.0, out=torch.empty_like(counts))
        for i, mask in enumerate(masks):
            # sums of 0/1 floats (and their products) of a chunk: integers below 2**24, exact
            changed = int(mask.sum())
            alone = int(torch.dot(mask, unique))
            total[i, 0] += changed - alone  # changed entries that another model changed too
            total[i, 1] += alone
    return total


def ram_scales(counts: torch.Tensor, *, r: float, alpha: float, epsilon: float) -> torch.Tensor:
    r"""Each model's factor on its unique entries, float32:
    :math:`\lambda_i = 1 + r\,\operatorname{clamp}(\rho_i, 0, \alpha)`,
    :math:`\rho_i = s_i / \max(u_i, \epsilon)` from :func:`ram_counts`
    (computed in float32 as mergekit computes it).

    Examples
    --------
    >>> ram_scales(torch.tensor([[1, 10], [5, 0]]), r=0.1, alpha=0.2, epsilon=1e-5)
    tensor([1.0100, 1.0200])
    """
    shared, unique = counts[:, 0], counts[:, 1]
    rho = shared / unique.clamp(min=float(epsilon))
    return 1 + float(r) * rho.clamp(min=0, max=float(alpha))


def reinforced_agent_merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    epsilon: float = 1e-5,
    tensor_local: bool = False,
    r: float = 0.1,
    alpha: float = 0.2,
    counts: torch.Tensor | None = None,
    method: str = "ram",
) -> torch.Tensor:
    r"""RAM and RAM+ (tensor-local): the general implementation of :func:`ram` and
    :func:`ramplus_tl`.

    With task vectors :math:`\tau_i = \theta_i - \theta_b`, masks
    :math:`m_i = |\tau_i| > \epsilon` and counts :math:`c = \sum_i m_i`, entry
    by entry

    .. math::

        \theta = \theta_b + \sum_i m_i \tau_i \left( [c = 1]\,\lambda_i
        + \frac{[c > 1]}{c} \right),

    with :math:`\lambda_i = 1` (``ram``) or, with ``tensor_local``, the factor
    :func:`ram_scales` from the counts of the whole tensor (``ramplus_tl``).
    Each model's term is computed as mergekit computes it (its unique entries
    times :math:`\lambda_i`, its shared ones divided by :math:`c`) and the
    terms are added in model order, in float32.

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base model's tensor. Not modified.
    epsilon : float, default 1e-5
        Threshold on :math:`|\tau|` for an entry to count as changed.
    tensor_local : bool, default False
        Scale the unique entries by :math:`\lambda_i` (RAM+ tensor-local).
    r, alpha : float
        The rescaling's strength and largest ratio (with ``tensor_local``).
    counts : Tensor, optional
        :func:`ram_counts` of the whole tensors, when the inputs are a block of
        rows of them (the engine's row blocks); counted from the inputs when
        not given.
    method : str
        The method's name, for error messages.

    Returns
    -------
    Tensor
        float32.
    """
    base = _check(tensors, base, method)
    epsilon = float(epsilon)
    scales: list[float | torch.Tensor] = [1.0] * len(tensors)
    chunks: Iterable[tuple[slice, list[torch.Tensor], list[torch.Tensor], torch.Tensor]]
    chunks = _chunks(tensors, base, epsilon)
    if tensor_local:
        if counts is None and base.numel() * (8 * len(tensors) + 4) <= HOLD_BYTES:
            chunks = list(chunks)  # the counting pass's chunks serve the merge too
            counts = _count(chunks, len(tensors))
        elif counts is None:  # too large to hold: the merge computes them again
            counts = _count(_chunks(tensors, base, epsilon), len(tensors))
        scales = list(ram_scales(counts, r=r, alpha=alpha, epsilon=epsilon))
    out = torch.empty(base.numel(), dtype=torch.float32)
    for index, taus, masks, count in chunks:
        unique = torch.eq(count, 1.0, out=torch.empty_like(count))  # 0/1 floats
        shared = torch.rsub(unique, 1.0) if tensor_local else None
        divisor = count.clamp_(min=1)
        part = out[index].copy_(base.reshape(-1)[index])
        merged = torch.zeros_like(part)
        for tau, mask, scale in zip(taus, masks, scales):
            term = tau.mul_(mask)
            if shared is not None:
                # tau * lambda on unique entries, tau * 1 elsewhere, as mergekit's: the factor
                # shared + lambda * unique is exactly one or lambda (one of its terms is 0)
                term.mul_(torch.add(shared, unique, alpha=float(scale)))
            merged.add_(term.div_(divisor))
        part.add_(merged)
    return out.reshape(base.shape)


def ram(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    r"""RAM: an entry changed by one model keeps its change, one changed by several their mean.

    .. math::

        \theta = \theta_b + \sum_i \frac{m_i \tau_i}{\max(c, 1)}, \qquad
        m_i = |\tau_i| > \epsilon,\ c = \sum_i m_i .

    Elementwise, so large tensors merge in blocks of rows with no pre-pass.
    See :func:`reinforced_agent_merge`.

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base model's tensor. Not modified.
    epsilon : float, default 1e-5
        Threshold on :math:`|\tau|` for an entry to count as changed.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    "Reinforced Agent Merging", 2026. https://arxiv.org/abs/2601.13572 ;
    mergekit's ``ram`` method.

    Examples
    --------
    >>> base = torch.zeros(3)
    >>> a, b = torch.tensor([2.0, 4.0, 0.0]), torch.tensor([0.0, 2.0, 1e-6])
    >>> ram([a, b], base)  # unique: kept whole; shared: the mean; below epsilon: ignored
    tensor([2., 3., 0.])
    """
    return reinforced_agent_merge(tensors, base, epsilon=epsilon, method="ram")


def ramplus_tl(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""RAM+ tensor-local: RAM with each model's unique entries scaled up by how much it shares.

    Per model i over the whole tensor: :math:`s_i` its changed entries that
    another model changed too, :math:`u_i` those it changed alone,
    :math:`\rho_i = s_i / \max(u_i, \epsilon)` and
    :math:`\lambda_i = 1 + r\,\operatorname{clamp}(\rho_i, 0, \alpha)`; its
    unique entries enter the merge times :math:`\lambda_i`, its shared ones
    divided by the count as in :func:`ram`. The counts are the method's
    reduction (:func:`ram_counts`), so large tensors merge in blocks of rows.

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base model's tensor. Not modified.
    r : float, default 0.1
        Strength of the rescaling.
    alpha : float, default 0.2
        Largest ratio :math:`\rho` counted.
    epsilon : float, default 1e-5
        Threshold on :math:`|\tau|`, and the smallest divisor of :math:`\rho`.
    counts : Tensor, optional
        :func:`ram_counts` of the whole tensors, for a block of rows of them.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    "Reinforced Agent Merging", 2026. https://arxiv.org/abs/2601.13572 ;
    mergekit's ``ramplus_tl`` method.

    Examples
    --------
    >>> base = torch.zeros(4)
    >>> a, b = torch.tensor([2.0, 4.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 1.0, 3.0])
    >>> ramplus_tl([a, b], base, r=0.5, alpha=1.0)  # a: rho 1, lambda 1.5; b: rho 0.5
    tensor([3.0000, 3.0000, 1.2500, 3.7500])
    """
    return reinforced_agent_merge(
        tensors,
        base,
        epsilon=epsilon,
        tensor_local=True,
        r=r,
        alpha=alpha,
        counts=counts,
        method="ramplus_tl",
    )
