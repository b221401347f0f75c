"""Weighted averaging of checkpoints ("model soup", mergekit's ``linear``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import PER_MODEL, MethodParameters

__all__ = ["LinearParameters", "linear"]


class LinearParameters(MethodParameters):
    """Parameters of :func:`linear`."""

    weight: Annotated[float, PER_MODEL] = Field(
        1.0, description="the model's weight w_i (any real number)"
    )
    normalize: bool = Field(
        True, description="divide by the sum of the weights (false: plain weighted sum)"
    )


_CHUNK = 1 << 18
"""Entries summed at once."""


def linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Sequence[float] | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    r"""Weighted average of tensors: :math:`\sum_i w_i \theta_i / \sum_i w_i`.

    Parameters
    ----------
    tensors : sequence of Tensor
        The models' tensors of one name, all of one shape. Not modified.
    base : Tensor, optional
        Unused; accepted so that every method has the same signature.
    weight : sequence of float, optional
        One weight per tensor; equal weights when omitted.
    normalize : bool, default True
        Divide by :math:`\sum_i w_i`. With ``False`` the result is the plain
        weighted sum :math:`\sum_i w_i \theta_i`.

    Returns
    -------
    Tensor
        float32 (accumulation is always in float32).

    Raises
    ------
    ConfigError
        The number of weights differs from the number of tensors, or the weights
        sum to zero with ``normalize=True``.

    References
    ----------
    Wortsman et al., "Model soups: averaging weights of multiple fine-tuned
    models improves accuracy without increasing inference time", ICML 2022.

    Examples
    --------
    >>> a, b = torch.tensor([0.0, 2.0]), torch.tensor([4.0, 6.0])
    >>> linear([a, b], weight=[3.0, 1.0])
    tensor([1., 3.])
    >>> linear([a, b], weight=[0.5, 0.5], normalize=False)
    tensor([2., 4.])
    """
    if len(tensors) == 0:
        raise ConfigError("linear: no tensors to merge; give at least one model")
    weights = [1.0] * len(tensors) if weight is None else [float(w) for w in weight]
    if len(weights) != len(tensors):
        raise ConfigError(
            f"linear: {len(weights)} weights for {len(tensors)} models; give one weight per model"
        )
    total = sum(weights)
    if normalize and abs(total) < 1e-8:
        raise ConfigError(
            f"linear: the weights {weights} sum to {total:g}, so they cannot be normalised; "
            "change the weights or set normalize: false"
        )
    out = torch.empty(tensors[0].shape, dtype=torch.float32)
    flats = [t.reshape(-1) for t in tensors]
    result = out.view(-1)
    size = result.numel()
    # chunk by chunk, so that the running sum stays in the processor's cache
    for start in range(0, size, _CHUNK):
        index = slice(start, min(size, start + _CHUNK))
        part = result[index].zero_()
        for flat, w in zip(flats, weights):
            part.add_(flat[index].to(torch.float32), alpha=w)
        if normalize:
            part.div_(total)
    return out
