"""DARE: drop task-vector entries at random and rescale, then sum or TIES-merge.

``rescale`` (on by default, as in mergekit) follows mergekit 0.1.5 by default:
each model's kept entries of a tensor are multiplied by the L1 norm of its task
vector over the L1 norm of what is kept (``rescale_method: l1``), a whole-tensor
value that :func:`dare_rescale_factors` computes first when the engine merges a
large tensor in blocks of rows. ``rescale_method: exact`` divides by the keep
probability instead (the paper's :math:`1/(1-p)`), elementwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field

from modelfuse.merge.methods.rescaling import RescaleFactors, elementwise_rescale, rescale_factors
from modelfuse.merge.methods.sign_consensus import ConsensusMethod
from modelfuse.merge.methods.sparsification import RescaleMethod
from modelfuse.merge.methods.task_vectors import SparsifyingParameters, generalized_task_arithmetic

__all__ = [
    "DareLinearParameters",
    "DareTiesParameters",
    "dare_linear",
    "dare_rescale_factors",
    "dare_ties",
    "norm_rescale",
]


class DareLinearParameters(SparsifyingParameters):
    """Parameters of :func:`dare_linear` (mergekit's ``dare_linear``)."""

    rescale: bool = Field(
        True,
        description="rescale the kept entries (on, as in mergekit; how: rescale_method)",
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


def norm_rescale(parameters: Mapping[str, Any]) -> bool:
    """Whether a tensor's resolved parameters rescale to a norm of the whole tensor, so
    that the engine computes :func:`dare_rescale_factors` before merging it in blocks."""
    return not elementwise_rescale(parameters)


def dare_rescale_factors(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    density: Sequence[float] | float | None = None,
    rescale: bool = True,
    rescale_method: RescaleMethod = "l1",
    random_seed: int = 0,
    name: str = "",
) -> RescaleFactors:
    """The per-tensor reduction of :func:`dare_linear` and :func:`dare_ties` with a norm
    rescale: each model's factor (norm of its task vector over the norm of what its
    drop mask keeps) for the whole tensor, and the masks themselves (one bit per
    entry), drawn as the merge draws them (from the generator seeded by
    ``random_seed`` and the tensor's ``name``; see
    :func:`~modelfuse.merge.methods.rescaling.rescale_factors`).

    Examples
    --------
    >>> from modelfuse.merge.execute import tensor_generator
    >>> base, model = torch.zeros(1000), torch.ones(1000)
    >>> [factor] = dare_rescale_factors([model], base, density=0.25, name="w").factors
    >>> dropped = dare_linear([model], base, density=0.25, rescale=False,
    ...                       generator=tensor_generator(0, "w"))
    >>> kept = int(dropped.sum())
    >>> abs(factor - 1000 / kept) < 1e-12
    True
    """
    # imported here: the engine imports the method registry, which imports this module
    from modelfuse.merge.execute import tensor_generator

    return rescale_factors(
        tensors,
        base,
        density=density,
        sparsification="random",
        rescale=rescale,
        rescale_method=rescale_method,
        generator=tensor_generator(random_seed, name),
        method="dare",
    )


def dare_linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Sequence[float] | None = None,
    density: Sequence[float] | float | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    rescale_method: RescaleMethod = "l1",
    random_seed: int = 0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
    rescale_factors: RescaleFactors | Sequence[float] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    r"""DARE then task arithmetic: :math:`\theta_b + \lambda \sum_i w_i\, c_i\, m_i \odot \tau_i`.

    Each entry of each task vector :math:`\tau_i = \theta_i - \theta_b` is kept
    with probability :math:`d_i` (``density``; the drop rate is
    :math:`p = 1 - d_i`), :math:`m_i \sim \mathrm{Bernoulli}(d_i)`, and what
    is kept is rescaled by :math:`c_i`: by default (``rescale_method="l1"``, as
    mergekit 0.1.5) :math:`c_i = \|\tau_i\|_1 / \|m_i \odot \tau_i\|_1` over
    the tensor (1 when either is below 1e-7), so each task vector keeps its L1
    norm; with ``rescale_method="exact"`` :math:`c_i = 1 / d_i` exactly (the
    paper's); with ``rescale=False`` :math:`c_i = 1`. Nothing is rescaled at
    :math:`d_i \ge 1`.

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
    rescale_method : {"l1", "exact", "l2", "linf"}, default "l1"
        ``"l1"`` restores each task vector's L1 norm over the tensor (mergekit's
        ``rescale``); ``"l2"`` and ``"linf"`` those norms; ``"exact"``
        divides by the keep probability (the paper).
    random_seed : int, default 0
        Seed used when no ``generator`` is given.
    int8_mask : bool, default False
        Accepted for mergekit configurations; no effect.
    generator : torch.Generator, optional
        Source of the drop masks; the engine seeds one per tensor from
        ``random_seed`` and the tensor's name. Each model's draws are
        :func:`~modelfuse.merge.methods.random_drops.uniform_draws` of a seed drawn
        from it, one per flat entry of the whole tensor.
    rescale_factors : RescaleFactors or sequence of float, optional
        :func:`dare_rescale_factors` of the whole tensor, when the inputs are a
        block of rows of it and the rescale is a norm's; found from the inputs
        when not given.
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
    >>> out = dare_linear([torch.ones(1000)], base, density=0.25, rescale_method="exact")
    >>> sorted(set(out.tolist()))
    [0.0, 4.0]
    >>> out = dare_linear([torch.ones(1000)], base, density=0.25)  # L1 norm kept
    >>> round(float(out.sum()), 3)
    1000.0
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
        rescale_factors=rescale_factors,
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
    rescale_method: RescaleMethod = "l1",
    random_seed: int = 0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
    rescale_factors: RescaleFactors | Sequence[float] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    r"""DARE then TIES' sign election and disjoint merge.

    The task vectors are dropped and rescaled as in :func:`dare_linear`, then
    merged as in :func:`~modelfuse.merge.methods.ties.ties` (sign elected by
    ``consensus_method``, only agreeing entries summed; divided by their
    weights' sum when ``normalize``, off by default as in mergekit).

    Parameters
    ----------
    tensors, base, weight, density, lambda_, normalize, rescale, rescale_method,
    random_seed, int8_mask, generator, rescale_factors, offset
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
        rescale_factors=rescale_factors,
        offset=offset,
        method="dare_ties",
    )
