"""DELLA: drop task-vector entries with probabilities ranked by magnitude, then sum or TIES-merge.

DARE with a keep probability per entry (``sparsification="della_magprune"`` of
:func:`~modelfuse.merge.methods.task_vectors.generalized_task_arithmetic`): within each
row, the entries of larger magnitude are kept more often. The draws are DARE's
(:func:`~modelfuse.merge.methods.random_drops.uniform_draws`), so a merge is reproducible
from ``random_seed`` and the tensor's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field, ValidationInfo, field_validator

from modelfuse.merge.methods.dare import DareLinearParameters, _generator
from modelfuse.merge.methods.rescaling import RescaleFactors, rescale_factors
from modelfuse.merge.methods.sign_consensus import ConsensusMethod
from modelfuse.merge.methods.sparsification import RescaleMethod
from modelfuse.merge.methods.task_vectors import generalized_task_arithmetic
from modelfuse.merge.parameters import PER_MODEL

__all__ = [
    "DellaLinearParameters",
    "DellaParameters",
    "della",
    "della_linear",
    "della_rescale_factors",
]


class DellaLinearParameters(DareLinearParameters):
    """Parameters of :func:`della_linear` (mergekit's ``della_linear``)."""

    rescale_method: RescaleMethod = Field(
        "l1",
        description="'l1' (as mergekit): multiply the kept entries so that each tensor's task "
        "vector keeps its L1 norm ('l2', 'linf': those norms); 'exact': divide each kept "
        "entry by its own keep probability (the paper's)",
    )

    epsilon: Annotated[float, PER_MODEL] = Field(
        0.15,
        description="keep probabilities run from density - epsilon (smallest magnitude of a "
        "row) to density + epsilon (largest); both must be in (0, 1)",
    )

    @field_validator("epsilon")
    @classmethod
    def _probabilities_in_range(cls, e: float, info: ValidationInfo) -> float:
        # checked per model as configurations are planned (the merge checks it again)
        d = info.data.get("density")
        if d is not None and 0 < d < 1 and not (0 < d - e < 1 and 0 < d + e < 1):
            raise ValueError(
                f"{e:g} with density {d:g} gives keep probabilities from {d - e:g} to {d + e:g}; "
                "choose epsilon so that density - epsilon and density + epsilon are in (0, 1)"
            )
        return e


class DellaParameters(DellaLinearParameters):
    """Parameters of :func:`della` (mergekit's ``della``)."""

    normalize: bool = Field(
        True,
        description="divide by the sum of the weights of the models agreeing with the "
        "elected sign (on, as in mergekit)",
    )
    consensus_method: ConsensusMethod = Field(
        "sum", description="sign election: 'sum' of weighted task vectors, or 'count' of signs"
    )


def della_rescale_factors(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    density: Sequence[float] | float | None = None,
    epsilon: Sequence[float] | float | None = 0.15,
    rescale: bool = True,
    rescale_method: RescaleMethod = "l1",
    random_seed: int = 0,
    name: str = "",
) -> RescaleFactors:
    """The per-tensor reduction of :func:`della` and :func:`della_linear` with a norm
    rescale: each model's factor and drop mask over the whole tensor, drawn as the
    merge draws them (see :func:`~modelfuse.merge.methods.dare.dare_rescale_factors`).

    Examples
    --------
    >>> base, model = torch.zeros(4, 250), torch.ones(4, 250)
    >>> [factor] = della_rescale_factors([model], base, density=0.5, name="w").factors
    >>> 1.5 < factor < 2.5
    True
    """
    # imported here: the engine imports the method registry, which imports this module
    from modelfuse.merge.execute import tensor_generator

    return rescale_factors(
        tensors,
        base,
        density=density,
        epsilon=epsilon,
        sparsification="della_magprune",
        rescale=rescale,
        rescale_method=rescale_method,
        generator=tensor_generator(random_seed, name),
        method="della",
    )


def della_linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Sequence[float] | None = None,
    density: Sequence[float] | float | None = None,
    epsilon: Sequence[float] | float | None = 0.15,
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
    r"""DELLA's drop, then task arithmetic: :math:`\theta_b + \lambda \sum_i w_i\, c_i \odot m_i \odot \tau_i`.

    In each row of each task vector :math:`\tau_i = \theta_i - \theta_b` (the
    second dimension; a 1-D tensor is one row), the entry of magnitude rank
    :math:`r` among :math:`m` (0 the smallest) is kept with probability
    :math:`p = d_i - \epsilon_i + 2 \epsilon_i r / (m - 1)`
    (:func:`~modelfuse.merge.methods.random_drops.della_probabilities`):
    :math:`m_i \sim \mathrm{Bernoulli}(p)`. What is kept is rescaled by
    :math:`c_i`: by default (``rescale_method="l1"``, as mergekit 0.1.5) the L1
    norm of :math:`\tau_i` over the L1 norm of what is kept, over the tensor;
    with ``"exact"`` each kept entry is divided by its own :math:`p` (the
    paper's); with ``rescale=False`` :math:`c_i = 1`. At :math:`d_i \ge 1`
    nothing is dropped; at :math:`d_i \le 0` everything is.

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base model's tensor.
    weight : sequence of float, optional
        One weight per model (default 1).
    density : float or sequence of float, optional
        Mean keep probability per model (default 1: nothing dropped).
    epsilon : float or sequence of float, default 0.15
        Half the spread of the keep probabilities; ``density - epsilon`` and
        ``density + epsilon`` must be in (0, 1) when ``0 < density < 1``.
    lambda_ : float, default 1.0
        Scale of the merged task vector (``lambda`` in configurations).
    normalize : bool, default False
        Divide by the sum of the weights.
    rescale : bool, default True
        Rescale the kept entries.
    rescale_method : {"l1", "exact", "l2", "linf"}, default "l1"
        ``"l1"`` restores each task vector's L1 norm over the tensor (mergekit);
        ``"l2"``, ``"linf"`` those norms; ``"exact"`` divides each kept entry by
        its keep probability.
    random_seed : int, default 0
        Seed used when no ``generator`` is given.
    int8_mask : bool, default False
        Accepted for mergekit configurations; no effect.
    generator : torch.Generator, optional
        Source of the drops, as in :func:`~modelfuse.merge.methods.dare.dare_linear`:
        model i's draws are ``uniform_draws`` of a seed drawn from it, and entry
        e is kept when its draw plus its probability is at least 1.
    rescale_factors : RescaleFactors or sequence of float, optional
        :func:`della_rescale_factors` of the whole tensor, when the inputs are a
        block of rows of it.
    offset : int, default 0
        The flat index of the inputs' first entry in the whole tensor.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Deep, Bhardwaj and Poria, "DELLA-Merging: reducing interference in model merging
    through magnitude-based sampling", 2024. https://arxiv.org/abs/2406.11617

    Examples
    --------
    >>> base = torch.zeros(1, 1000)
    >>> ramp = torch.linspace(0.001, 1.0, 1000).reshape(1, -1)
    >>> out = della_linear([ramp], base, density=0.5, epsilon=0.4, rescale=False)
    >>> kept = out != 0
    >>> bool(kept[0, :500].sum() < kept[0, 500:].sum())  # larger entries kept more often
    True
    """
    del int8_mask
    return generalized_task_arithmetic(
        tensors,
        base,
        weight=weight,
        density=density,
        epsilon=epsilon,
        lambda_=lambda_,
        normalize=normalize,
        sparsification="della_magprune",
        rescale=rescale,
        rescale_method=rescale_method,
        generator=_generator(generator, random_seed),
        rescale_factors=rescale_factors,
        offset=offset,
        method="della_linear",
    )


def della(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Sequence[float] | None = None,
    density: Sequence[float] | float | None = None,
    epsilon: Sequence[float] | float | None = 0.15,
    lambda_: float = 1.0,
    normalize: bool = True,
    consensus_method: ConsensusMethod = "sum",
    rescale: bool = True,
    rescale_method: RescaleMethod = "l1",
    random_seed: int = 0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
    rescale_factors: RescaleFactors | Sequence[float] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    r"""DELLA: magnitude-ranked drops as in :func:`della_linear`, then TIES' sign election.

    The kept, rescaled and weighted task vectors elect a sign per entry
    (``consensus_method``) and only the agreeing ones are summed, divided by
    the sum of their weights (``normalize``, on by default as in mergekit),
    times :math:`\lambda`, added to the base.

    Parameters
    ----------
    tensors, base, weight, density, epsilon, lambda_, rescale, rescale_method,
    random_seed, int8_mask, generator, rescale_factors, offset
        As in :func:`della_linear`.
    normalize : bool, default True
        Divide by the sum of the weights of the agreeing models.
    consensus_method : {"sum", "count"}, default "sum"
        How the sign is elected.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Deep, Bhardwaj and Poria, "DELLA-Merging", 2024. https://arxiv.org/abs/2406.11617;
    Yadav et al., "TIES-Merging", NeurIPS 2023.

    Examples
    --------
    >>> base = torch.zeros(3)
    >>> a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-2.0, -1.0, 1.0])
    >>> della([a, b], base)  # density 1: TIES' election and disjoint mean
    tensor([-2.0000, -1.5000,  2.0000])
    """
    del int8_mask
    return generalized_task_arithmetic(
        tensors,
        base,
        weight=weight,
        density=density,
        epsilon=epsilon,
        lambda_=lambda_,
        normalize=normalize,
        sparsification="della_magprune",
        consensus_method=consensus_method,
        rescale=rescale,
        rescale_method=rescale_method,
        generator=_generator(generator, random_seed),
        rescale_factors=rescale_factors,
        offset=offset,
        method="della",
    )
