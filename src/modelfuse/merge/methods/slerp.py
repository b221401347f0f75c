"""Spherical linear interpolation (SLERP) between two models."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import MethodParameters

__all__ = ["DOT_THRESHOLD", "SlerpParameters", "slerp", "slerp_products"]

_CHUNK = 1 << 20
"""Entries converted to float32 at a time."""

DOT_THRESHOLD = 0.9995
"""Above this ``|cos Ω|`` the tensors are treated as colinear and interpolated linearly."""

_EPS = 1e-8


class SlerpParameters(MethodParameters):
    """Parameters of :func:`slerp` (mergekit's ``slerp``)."""

    t: float = Field(
        description="interpolation factor: 0 gives the base (first) model, 1 the other one"
    )


def _pair(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)``: the tensor at ``t = 0`` and the one at ``t = 1``."""
    if base is not None:
        if len(tensors) != 1:
            raise ConfigError(
                f"slerp interpolates between two models: with base_model set, give exactly one "
                f"other model (got {len(tensors)})"
            )
        return base, tensors[0]
    if len(tensors) != 2:
        raise ConfigError(
            f"slerp interpolates between two models: give two models, or base_model and one "
            f"other model (got {len(tensors)} models and no base_model)"
        )
    return tensors[0], tensors[1]


def _blocks(size: int) -> list[slice]:
    return [slice(i, min(size, i + _CHUNK)) for i in range(0, size, _CHUNK)]


def slerp_products(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None
) -> torch.Tensor:
    """``[a·a, b·b, a·b]`` in float64: what SLERP needs of a whole tensor.

    Sums over blocks of rows add up to the whole tensor's, so the engine can
    compute them block by block and merge each block with :func:`slerp`.

    Examples
    --------
    >>> slerp_products([torch.tensor([3.0, 4.0])], torch.tensor([1.0, 0.0]))
    tensor([ 1., 25.,  3.], dtype=torch.float64)
    """
    a, b = _pair(tensors, base)
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    # Chunk by chunk in float32 (inputs may be bfloat16), summed in double.
    square_a = square_b = dot = 0.0
    for block in _blocks(flat_a.numel()):
        part_a, part_b = flat_a[block].to(torch.float32), flat_b[block].to(torch.float32)
        square_a += float(torch.dot(part_a, part_a))
        square_b += float(torch.dot(part_b, part_b))
        dot += float(torch.dot(part_a, part_b))
    return torch.tensor([square_a, square_b, dot], dtype=torch.float64)


def slerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    t: float,
    products: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Spherical interpolation between two tensors, each seen as one flat vector.

    With :math:`a` the base model's tensor (or the first model's, without a
    base) and :math:`b` the other model's,
    :math:`\cos\Omega = \hat a \cdot \hat b` and

    .. math:: \theta = \frac{\sin((1-t)\Omega)}{\sin\Omega} a + \frac{\sin(t\Omega)}{\sin\Omega} b .

    When the tensors are nearly parallel or antiparallel
    (:math:`|\cos\Omega| > 0.9995`) or one of them is zero (no angle is
    defined), the result is the linear interpolation :math:`(1-t) a + t b`.

    Parameters
    ----------
    tensors : sequence of Tensor
        One tensor when ``base`` is given, else two. Not modified.
    base : Tensor, optional
        The tensor at ``t = 0`` (mergekit's ``base_model``).
    t : float
        Interpolation factor; per tensor through gradients and filters in
        configurations.
    products : Tensor, optional
        :func:`slerp_products` of the whole tensors, when ``tensors`` and
        ``base`` are a block of rows of them (the engine's row blocks);
        computed from the inputs when not given.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985.
    https://en.wikipedia.org/wiki/Slerp

    Examples
    --------
    >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    >>> slerp([b], a, t=0.5)
    tensor([0.7071, 0.7071])
    >>> slerp([a, 3 * a], t=0.5)  # parallel: linear interpolation
    tensor([2., 0.])
    """
    a, b = _pair(tensors, base)
    t = float(t)
    if products is None:
        products = slerp_products(tensors, base)
    square_a, square_b, dot = (float(v) for v in products)
    norm_a, norm_b = math.sqrt(max(square_a, 0.0)), math.sqrt(max(square_b, 0.0))
    s0, s1 = 1.0 - t, t  # linear interpolation unless the tensors are far from parallel
    if norm_a > _EPS and norm_b > _EPS:
        cos = min(1.0, max(-1.0, dot / (norm_a * norm_b)))
        if abs(cos) <= DOT_THRESHOLD:
            omega = math.acos(cos)
            sin_omega = math.sin(omega)
            s0 = math.sin((1.0 - t) * omega) / sin_omega
            s1 = math.sin(t * omega) / sin_omega
    # Chunk by chunk in float32: no float32 copy of a whole input is made.
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    size = flat_a.numel()
    out = torch.empty(size, dtype=torch.float32)
    for block in _blocks(size):
        part_a, part_b = flat_a[block].to(torch.float32), flat_b[block].to(torch.float32)
        torch.mul(part_a, s0, out=out[block]).add_(part_b, alpha=s1)
    return out.reshape(a.shape)
