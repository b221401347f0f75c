"""SCE: select the task-vector entries that vary most, calculate weights, erase minority signs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import MethodParameters

__all__ = ["SceParameters", "WEIGHT_EPS", "sce", "sce_selection", "sce_weights"]

WEIGHT_EPS = 1e-6
"""Below this sum the models' weights are equal (``1 / N``), and the agreeing weight of an
entry divides at least by this (mergekit 0.1.5's constants)."""


class SceParameters(MethodParameters):
    """Parameters of :func:`sce` (mergekit's ``sce``)."""

    select_topk: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="fraction of the entries with nonzero variance across the task vectors "
        "kept (those of largest variance); 1 keeps every entry",
    )
    int8_mask: bool = Field(
        False,
        description="accepted for mergekit configurations (a memory option there); "
        "no effect on the result",
    )


def _task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    flat = base.reshape(-1).to(torch.float32)
    return [t.reshape(-1).to(torch.float32) - flat for t in tensors]


def sce_selection(taus: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor | None:
    """The selection step: a 0/1 float32 mask of the ``k = int(select_topk * nnz)``
    entries of largest variance across ``taus`` (population variance, over the
    models; ``nnz`` the entries whose variance is nonzero), among equal variances
    the lower flat position first. None when ``select_topk >= 1`` (all kept).

    Examples
    --------
    >>> taus = [torch.tensor([1.0, 0.0, 5.0, 2.0]), torch.tensor([-1.0, 0.0, 5.0, 0.0])]
    >>> sce_selection(taus, 0.5)  # variances 1, 0, 0, 1: nnz = 2, k = 1
    tensor([1., 0., 0., 0.])
    """
    if select_topk >= 1:
        return None
    n = len(taus)
    mean = torch.zeros_like(taus[0])
    for tau in taus:
        mean.add_(tau)
    mean.div_(n)
    variance = torch.zeros_like(taus[0])
    for tau in taus:
        deviation = tau - mean
        variance.addcmul_(deviation, deviation)
    variance.div_(n)
    del mean
    mask = torch.zeros_like(variance)
    k = int(int(torch.count_nonzero(variance)) * select_topk) if select_topk > 0 else 0
    if k == 0:
        return mask
    size = variance.numel()
    threshold = torch.kthvalue(variance, size - k + 1).values
    above = variance > threshold
    mask[above] = 1.0
    missing = k - int(above.sum())
    del above
    # the first `missing` entries equal to the threshold, by position
    ties = torch.nonzero(variance == threshold).reshape(-1)[:missing]
    mask[ties] = 1.0
    return mask


def sce_weights(taus: Sequence[torch.Tensor]) -> list[float]:
    r"""The calculation step: :math:`w_i = \overline{\tau_i^2} / \sum_j \overline{\tau_j^2}`,
    the mean square of each (selected) task vector over the tensor, normalised over the
    models; equal weights ``1 / N`` when the sum is below :data:`WEIGHT_EPS`.

    Examples
    --------
    >>> sce_weights([torch.tensor([1.0, 1.0]), torch.tensor([3.0, -1.0])])
    [0.16666666666666666, 0.8333333333333334]
    """
    squares = [float(torch.mean(tau.double() ** 2)) if tau.numel() else 0.0 for tau in taus]
    total = sum(squares)
    if abs(total) < WEIGHT_EPS:
        return [1.0 / len(taus)] * len(taus)
    return [s / total for s in squares]


def sce(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    r"""SCE: select, calculate, erase, merge (mergekit's ``sce``).

    With task vectors :math:`\tau_i = \theta_i - \theta_b`:

    1. select: unless ``select_topk`` is 1, keep only the ``select_topk``
       fraction of the entries with nonzero variance across the :math:`\tau_i`
       that vary most (:func:`sce_selection`), in every task vector;
    2. calculate: :math:`w_i = \overline{\tau_i^2} / \sum_j \overline{\tau_j^2}`
       over the tensor (:func:`sce_weights`);
    3. erase: elect :math:`\gamma = \operatorname{sign}(\sum_i \tau_i)` per
       entry (ties to +) and erase the entries whose sign is not
       :math:`\gamma` (zeros included);
    4. merge: :math:`\theta = \theta_b + \sum_i w_i e_i \tau_i / \max(\sum_i
       w_i e_i, 10^{-6})`, with :math:`e_i` 1 where :math:`\tau_i` was kept.

    The selection and the weights are whole-tensor values, so each tensor is
    merged whole (a few float32 tensors of its size at once).

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base model's tensor. Not modified.
    select_topk : float, default 1.0
        Fraction of the varying entries kept, in [0, 1].
    int8_mask : bool, default False
        Accepted for mergekit configurations; no effect.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Wan, Zhong, Huang, Quan, Bi and Shi, "FuseChat: knowledge fusion of chat models",
    2024. https://arxiv.org/abs/2408.07990

    Examples
    --------
    >>> base = torch.zeros(3)
    >>> a, b = torch.tensor([1.0, -2.0, 2.0]), torch.tensor([-1.0, -2.0, 4.0])
    >>> sce([a, b], base)  # mean squares 3 and 7: weights 0.3 and 0.7
    tensor([ 1.0000, -2.0000,  3.4000])
    """
    del int8_mask
    if base is None:
        raise ConfigError("sce needs a base model; set base_model")
    if not tensors:
        raise ConfigError("sce: no models besides the base; give at least one")
    taus = _task_vectors(tensors, base)
    mask = sce_selection(taus, select_topk)
    if mask is not None:
        for tau in taus:
            tau.mul_(mask)
        del mask
    weights = sce_weights(taus)
    total = torch.zeros_like(taus[0])
    for tau in taus:
        total.add_(tau)
    # +1 where the sum is >= 0, else -1
    elected = torch.sign(total).add_(1.0).clamp_(max=1.0).mul_(2.0).sub_(1.0)
    merged = total.zero_()
    divisor = torch.zeros_like(merged)
    for tau, w in zip(taus, weights):
        agree = torch.eq(torch.sign(tau), elected).to(torch.float32)
        merged.addcmul_(tau, agree, value=w)
        divisor.add_(agree, alpha=w)
    merged.div_(divisor.clamp_(min=WEIGHT_EPS))
    return merged.add_(base.reshape(-1).to(torch.float32)).reshape(base.shape)
