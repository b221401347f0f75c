"""Task arithmetic: add weighted task vectors to a base model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import PER_MODEL, MethodParameters

__all__ = ["TaskArithmeticParameters", "task_arithmetic"]


class TaskArithmeticParameters(MethodParameters):
    """Parameters of :func:`task_arithmetic`."""

    weight: Annotated[float, PER_MODEL] = Field(
        1.0, description="the weight w_i of the model's task vector; negative removes a skill"
    )
    lambda_: float = Field(
        1.0, alias="lambda", description="scale applied to the combined task vector"
    )
    normalize: bool = Field(
        False, description="divide the combined task vector by the sum of the weights"
    )


def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    r"""Task arithmetic: :math:`\theta_b + \lambda \sum_i w_i (\theta_i - \theta_b)`.

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

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Ilharco et al., "Editing models with task arithmetic", ICLR 2023.

    Examples
    --------
    >>> base = torch.tensor([1.0, 1.0])
    >>> a, b = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])
    >>> task_arithmetic([a, b], base, weight=[1.0, -0.5], lambda_=2.0)
    tensor([ 3., -1.])
    """
    if base is None:
        raise ConfigError("task_arithmetic needs a base model; set base_model")
    if len(tensors) == 0:
        raise ConfigError("task_arithmetic: no models besides the base; give at least one")
    weights = [1.0] * len(tensors) if weight is None else [float(w) for w in weight]
    if len(weights) != len(tensors):
        raise ConfigError(
            f"task_arithmetic: {len(weights)} weights for {len(tensors)} models; "
            "give one weight per model"
        )
    base32 = base.to(torch.float32)
    delta = torch.zeros(base.shape, dtype=torch.float32)
    scratch = torch.empty_like(delta)
    for tensor, w in zip(tensors, weights):
        torch.sub(tensor.to(torch.float32), base32, out=scratch)
        delta.add_(scratch, alpha=w)
    if normalize:
        total = sum(weights)
        delta.div_(total if abs(total) >= 1e-8 else 1.0)
    return base32 + delta.mul_(lambda_) if lambda_ != 1.0 else base32 + delta
