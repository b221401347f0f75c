"""Model breadcrumbs: drop the largest and the smallest task-vector entries, then merge."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from modelfuse.merge.methods.magnitude_threshold import TensorSelection
from modelfuse.merge.methods.rescaling import RescaledSelections, trim_reduction
from modelfuse.merge.methods.sign_consensus import ConsensusMethod
from modelfuse.merge.methods.sparsification import RescaleMethod
from modelfuse.merge.methods.task_vectors import SparsifyingParameters, generalized_task_arithmetic
from modelfuse.merge.parameters import PER_MODEL

__all__ = [
    "BreadcrumbsParameters",
    "BreadcrumbsTiesParameters",
    "breadcrumbs",
    "breadcrumbs_selections",
    "breadcrumbs_ties",
]


class BreadcrumbsParameters(SparsifyingParameters):
    """Parameters of :func:`breadcrumbs` (mergekit's ``breadcrumbs``)."""

    gamma: Annotated[float, PER_MODEL] = Field(
        0.01, ge=0.0, le=1.0, description="fraction of largest-magnitude entries dropped"
    )


class BreadcrumbsTiesParameters(BreadcrumbsParameters):
    """Parameters of :func:`breadcrumbs_ties` (mergekit's ``breadcrumbs_ties``)."""

    consensus_method: ConsensusMethod = Field(
        "sum", description="sign election: 'sum' of weighted task vectors, or 'count' of signs"
    )


def breadcrumbs(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Sequence[float] | None = None,
    density: Sequence[float] | float | None = None,
    gamma: Sequence[float] | float = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    rescale_method: RescaleMethod = "l1",
    int8_mask: bool = False,
    selections: Sequence[Sequence[TensorSelection]] | RescaledSelections | None = None,
    offset: int = 0,
) -> torch.Tensor:
    r"""Breadcrumbs then task arithmetic.

    Of each task vector :math:`\tau_i = \theta_i - \theta_b` with ``n`` entries,
    the ``int(gamma * n)`` largest magnitudes are dropped, and the next
    ``int(density * n)`` are kept (the smallest ``1 - density - gamma`` are
    dropped); when ``density + gamma > 1`` fewer large entries are dropped so
    that ``int(density * n)`` are kept (mergekit 0.1.5's counts: a tensor of
    fewer than ``1 / density`` entries keeps none). Then
    :math:`\theta = \theta_b + \lambda \sum_i w_i \hat\tau_i`.

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base model's tensor.
    weight : sequence of float, optional
        One weight per model (default 1).
    density : float or sequence of float, optional
        Fraction kept per model (default 1: nothing dropped).
    gamma : float or sequence of float, default 0.01
        Fraction of largest magnitudes dropped per model.
    lambda_ : float, default 1.0
        Scale of the merged task vector (``lambda`` in configurations).
    normalize : bool, default False
        Divide by the sum of the weights.
    rescale, rescale_method
        Rescale the kept entries (see :func:`~modelfuse.merge.methods.task_vectors.sparsify`);
        off by default, and to the L1 norm when on, as in mergekit.
    int8_mask : bool, default False
        Accepted for mergekit configurations; no effect.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Davari and Belilovsky, "Model breadcrumbs: scaling multi-task model merging
    with sparse masks", ECCV 2024. https://arxiv.org/abs/2312.06795

    Examples
    --------
    >>> base = torch.zeros(5)
    >>> a = torch.tensor([5.0, -4.0, 3.0, 2.0, 1.0])
    >>> breadcrumbs([a], base, density=0.4, gamma=0.2)
    tensor([ 0., -4.,  3.,  0.,  0.])
    """
    del int8_mask
    return generalized_task_arithmetic(
        tensors,
        base,
        weight=weight,
        density=density,
        gamma=gamma,
        lambda_=lambda_,
        normalize=normalize,
        sparsification="magnitude_outliers",
        rescale=rescale,
        rescale_method=rescale_method,
        selections=selections,
        offset=offset,
        method="breadcrumbs",
    )


def breadcrumbs_ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Sequence[float] | None = None,
    density: Sequence[float] | float | None = None,
    gamma: Sequence[float] | float = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    consensus_method: ConsensusMethod = "sum",
    rescale: bool = False,
    rescale_method: RescaleMethod = "l1",
    int8_mask: bool = False,
    selections: Sequence[Sequence[TensorSelection]] | RescaledSelections | None = None,
    offset: int = 0,
) -> torch.Tensor:
    r"""Breadcrumbs then TIES' sign election and disjoint merge.

    Parameters
    ----------
    tensors, base, weight, density, gamma, lambda_, normalize, rescale,
    rescale_method, int8_mask
        As in :func:`breadcrumbs`.
    consensus_method : {"sum", "count"}, default "sum"
        How the sign is elected.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Davari and Belilovsky, "Model breadcrumbs", ECCV 2024.
    https://arxiv.org/abs/2312.06795; Yadav et al., "TIES-Merging", NeurIPS 2023.

    Examples
    --------
    >>> base = torch.zeros(4)
    >>> a, b = torch.tensor([9.0, 2.0, -1.0, 0.1]), torch.tensor([1.0, -3.0, -2.0, 9.0])
    >>> breadcrumbs_ties([a, b], base, density=0.5, gamma=0.25)
    tensor([ 0., -3., -3.,  0.])
    """
    del int8_mask
    return generalized_task_arithmetic(
        tensors,
        base,
        weight=weight,
        density=density,
        gamma=gamma,
        lambda_=lambda_,
        normalize=normalize,
        sparsification="magnitude_outliers",
        consensus_method=consensus_method,
        rescale=rescale,
        rescale_method=rescale_method,
        selections=selections,
        offset=offset,
        method="breadcrumbs_ties",
    )


def breadcrumbs_selections(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    density: Sequence[float] | float | None = None,
    gamma: Sequence[float] | float = 0.01,
    rescale: bool = False,
    rescale_method: RescaleMethod = "l1",
) -> list[list[TensorSelection]] | RescaledSelections:
    """The per-tensor reduction of :func:`breadcrumbs` and :func:`breadcrumbs_ties`: each
    model's two magnitude thresholds of the whole tensor, and with a norm rescale its
    factor (see :func:`~modelfuse.merge.methods.rescaling.trim_reduction`).

    Examples
    --------
    >>> a = torch.tensor([5.0, -4.0, 3.0, 2.0, 1.0])
    >>> breadcrumbs_selections([a], torch.zeros(5), density=0.4, gamma=0.2)
    [[TensorSelection(value=3.0, cutoff=None), TensorSelection(value=5.0, cutoff=None)]]
    """
    return trim_reduction(
        tensors,
        base,
        density=density,
        gamma=gamma,
        sparsification="magnitude_outliers",
        rescale=rescale,
        rescale_method=rescale_method,
        method="breadcrumbs",
    )
