"""Task arithmetic: add weighted task vectors to a base model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelfuse.merge.methods.task_vectors import TaskVectorParameters, generalized_task_arithmetic

__all__ = ["TaskArithmeticParameters", "task_arithmetic"]


class TaskArithmeticParameters(TaskVectorParameters):
    """Parameters of :func:`task_arithmetic` (mergekit's ``task_arithmetic``)."""


def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    int8_mask: bool = False,
) -> torch.Tensor:
    r"""Task arithmetic: :math:`\theta_b + \lambda \sum_i w_i (\theta_i - \theta_b)`.

    The plain setting of
    :func:`~modelfuse.merge.methods.task_vectors.generalized_task_arithmetic`: no
    sparsification, no sign election.

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base (pre-trained) model's tensor; task vectors are
        :math:`\tau_i = \theta_i - \theta_b`.
    weight : sequence of float, optional
        One weight per model (default 1). A negative weight subtracts the
        task vector ("forgetting via negation").
    lambda_ : float, default 1.0
        Scale of the combined task vector (``lambda`` in configurations).
    normalize : bool, default False
        Divide the combined task vector by :math:`\sum_i w_i` before scaling
        (a sum of zero is treated as one, as mergekit does).
    int8_mask : bool, default False
        Accepted for mergekit configurations; no effect.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Ilharco et al., "Editing models with task arithmetic", ICLR 2023.
    https://arxiv.org/abs/2212.04089

    Examples
    --------
    >>> base = torch.tensor([1.0, 1.0])
    >>> a, b = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])
    >>> task_arithmetic([a, b], base, weight=[1.0, -0.5], lambda_=2.0)
    tensor([ 3., -1.])
    """
    del int8_mask
    return generalized_task_arithmetic(
        tensors,
        base,
        weight=weight,
        lambda_=lambda_,
        normalize=normalize,
        method="task_arithmetic",
    )
