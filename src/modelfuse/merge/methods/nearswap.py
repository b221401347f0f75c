"""NearSwap: take the other model's value where it is close to the base's (mergekit's ``nearswap``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import MethodParameters

__all__ = ["MIN_DISTANCE", "NearSwapParameters", "nearswap"]

MIN_DISTANCE = 1e-6
"""Distances ``|a - b|`` below this count as this (mergekit's clamp), so equal entries
give a finite weight."""

_CHUNK = 1 << 18
"""Entries processed at once; temporaries stay one chunk whatever the tensor size."""


class NearSwapParameters(MethodParameters):
    """Parameters of :func:`nearswap` (mergekit's ``nearswap``)."""

    t: float = Field(
        description="distance scale: entries of the two models closer than t take the other "
        "model's value; farther ones move by t toward it"
    )


def nearswap(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    t: float,
) -> torch.Tensor:
    r"""NearSwap: interpolate toward the other model entry by entry, fully where it is close.

    With :math:`a` the base model's tensor and :math:`b` the other model's,
    entry by entry

    .. math::

        w = \operatorname{clip}\!\left(\frac{t}{\max(|a - b|, 10^{-6})}, 0, 1\right),
        \qquad \theta = w\,b + (1 - w)\,a .

    Entries that differ by at most :math:`t` take :math:`b`'s value; entries
    that differ more move toward :math:`b` by :math:`t` in absolute terms
    (:math:`|\theta - a| = t`), so a small :math:`t` keeps the base wherever the
    models disagree. :math:`t \le 0` gives the base.

    Parameters
    ----------
    tensors : sequence of Tensor
        Exactly one tensor: the other (secondary) model's. Not modified.
    base : Tensor
        The base model's tensor. Not modified.
    t : float
        Distance scale; per tensor through gradients and filters in
        configurations.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Alchemonaut, "QuartetAnemoi-70B-t0.0001" (the NearSwap merge),
    https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001 ; mergekit's
    ``nearswap`` method.

    Examples
    --------
    >>> base = torch.tensor([0.0, 0.0, 0.0])
    >>> other = torch.tensor([0.05, 0.2, -1.0])
    >>> nearswap([other], base, t=0.1)  # close: swapped; far: moved by t toward it
    tensor([ 0.0500,  0.1000, -0.1000])
    """
    if base is None:
        raise ConfigError("nearswap needs a base model; set base_model")
    if len(tensors) != 1:
        raise ConfigError(
            "nearswap merges the base model with exactly one other model; "
            f"got {len(tensors)} other models"
        )
    other = tensors[0]
    if other.shape != base.shape:
        raise ConfigError(
            f"nearswap: the model's tensor has shape {tuple(other.shape)} and the base's "
            f"{tuple(base.shape)}; they must be equal"
        )
    t = float(t)
    flat_a, flat_b = base.reshape(-1), other.reshape(-1)
    size = flat_a.numel()
    out = torch.empty(size, dtype=torch.float32)
    # Chunk by chunk in float32: inputs stay in their dtype, temporaries stay small.
    for start in range(0, size, _CHUNK):
        index = slice(start, min(size, start + _CHUNK))
        a, b = flat_a[index].to(torch.float32), flat_b[index].to(torch.float32)
        difference = b - a
        weight = torch.reciprocal(difference.abs().clamp_(min=MIN_DISTANCE)).mul_(t)
        weight.clamp_(0.0, 1.0)
        # w b + (1 - w) a, written as mergekit writes it (not a + w (b - a)): the same
        # float32 rounding
        part = out[index]
        torch.mul(weight, b, out=part)
        part.add_(weight.neg_().add_(1.0).mul_(a))
    return out.reshape(base.shape)
