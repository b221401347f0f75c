"""DARE: drop task-vector entries at random and rescale, then sum or TIES-merge."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from modelfuse.merge.task_vectors import (
    ConsensusMethod,
    RescaleMethod,
    SparsifyingParameters,
    generalized_task_arithmetic,
)

__all__ = ["DareLinearParameters", "DareTiesParameters", "dare_linear", "dare_ties"]


class DareLinearParameters(SparsifyingParameters):
    """Parameters of :func:`dare_linear` (mergekit's ``dare_linear``)."""

    rescale: bool = Field(
        True, description="rescale the kept entries (DARE's rescale; see rescale_method)"
    )
    random_seed: int = Field(
        0,
        description="seed of the drop masks; each tensor draws from a generator seeded by "
        "this and its name, so results do not depend on threads or order",
    )


class DareTiesParameters(DareLinearParameters):
    """Parameters of :func:`dare_ties` (mergekit's ``dare_ties``)."""

    consensus_method: ConsensusMethod = Field(
        "sum", description="sign election: 'sum' of weighted task vectors, or 'count' of signs"
    )


def _generator(generator: torch.Generator | None, random_seed: int) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(random_seed)


def dare_linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Sequence[float] | None = None,
    density: Sequence[float] | float | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    rescale_method: RescaleMethod = "exact",
    random_seed: int = 0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
    offset: int = 0,
) -> torch.Tensor:
    r"""DARE then task arithmetic: :math:`\theta_b + \lambda \sum_i w_i\, m_i \odot \tau_i / d_i`.

    Each entry of each task vector :math:`\tau_i = \theta_i - \theta_b` is kept
    with probability :math:`d_i` (``density``; the drop rate is
    :math:`p = 1 - d_i`), :math:`m_i \sim \mathrm{Bernoulli}(d_i)`, and what
    is kept is divided by exactly :math:`d_i = 1 - p` (``rescale_method="exact"``).

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base model's tensor.
    weight : sequence of float, optional
        One weight per model (default 1).
    density : float or sequence of float, optional
        Keep probability per model (default 1: nothing dropped).
    lambda_ : float, default 1.0
        Scale of the merged task vector (``lambda`` in configurations).
    normalize : bool, default False
        Divide by the sum of the weights.
    rescale : bool, default True
        Rescale the kept entries; ``False`` drops without rescaling.
    rescale_method : {"exact", "l1", "l2", "linf"}, default "exact"
        ``"exact"`` divides by the keep probability (the paper);
        ``"l1"`` restores each task vector's L1 norm (mergekit's implementation).
    random_seed : int, default 0
        Seed used when no ``generator`` is given.
    int8_mask : bool, default False
        Accepted for mergekit configurations; no effect.
    generator : torch.Generator, optional
        Source of the drop masks; the engine seeds one per tensor from
        ``random_seed`` and the tensor's name. Each model's draws are
        :func:`~modelfuse.merge.task_vectors.uniform_draws` of a seed drawn
        from it, one per flat entry of the whole tensor.
    offset : int, default 0
        The flat index of the inputs' first entry in the whole tensor, when
        they are a block of rows of it (the engine's row blocks): the block
        gets the whole tensor's draws for its entries.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Yu, Yu, Yu, Huang and Li, "Language models are Super Mario: absorbing abilities
    from homologous models as a free lunch", ICML 2024. https://arxiv.org/abs/2311.03099

    Examples
    --------
    >>> base = torch.zeros(1000)
    >>> out = dare_linear([torch.ones(1000)], base, density=0.25, random_seed=0)
    >>> sorted(set(out.tolist()))
    [0.0, 4.0]
    """
    del int8_mask
    return generalized_task_arithmetic(
        tensors,
        base,
        weight=weight,
        density=density,
        lambda_=lambda_,
        normalize=normalize,
        sparsification="random",
        rescale=rescale,
        rescale_method=rescale_method,
        generator=_generator(generator, random_seed),
        offset=offset,
        method="dare_linear",
    )


def dare_ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Sequence[float] | None = None,
    density: Sequence[float] | float | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    consensus_method: ConsensusMethod = "sum",
    rescale: bool = True,
    rescale_method: RescaleMethod = "exact",
    random_seed: int = 0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
    offset: int = 0,
) -> torch.Tensor:
    r"""DARE then TIES' sign election and disjoint merge.

    The task vectors are dropped and rescaled as in :func:`dare_linear`, then
    merged as in :func:`~modelfuse.merge.ties.ties` (sign elected by
    ``consensus_method``, only agreeing entries summed; divided by their
    weights' sum when ``normalize``, off by default as in mergekit).

    Parameters
    ----------
    tensors, base, weight, density, lambda_, normalize, rescale, rescale_method,
    random_seed, int8_mask, generator, offset
        As in :func:`dare_linear`.
    consensus_method : {"sum", "count"}, default "sum"
        How the sign is elected.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Yu et al., "Language models are Super Mario", ICML 2024.
    https://arxiv.org/abs/2311.03099; Yadav et al., "TIES-Merging", NeurIPS 2023.

    Examples
    --------
    >>> base = torch.zeros(3)
    >>> a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-2.0, -1.0, 1.0])
    >>> dare_ties([a, b], base)  # density 1: TIES' election without trimming
    tensor([-2., -3.,  4.])
    """
    del int8_mask
    return generalized_task_arithmetic(
        tensors,
        base,
        weight=weight,
        density=density,
        lambda_=lambda_,
        normalize=normalize,
        sparsification="random",
        consensus_method=consensus_method,
        rescale=rescale,
        rescale_method=rescale_method,
        generator=_generator(generator, random_seed),
        offset=offset,
        method="dare_ties",
    )
