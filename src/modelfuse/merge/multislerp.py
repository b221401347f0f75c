"""Spherical averaging of N models (mergekit's ``multislerp``), optionally of task vectors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated

import torch
from pydantic import Field

from modelfuse.errors import ConfigError, DataError
from modelfuse.merge.parameters import PER_MODEL, MethodParameters

__all__ = ["MultiSlerpParameters", "multislerp"]

_CHUNK = 1 << 18
"""Entries processed at once; temporaries stay one chunk whatever the tensor size."""


class MultiSlerpParameters(MethodParameters):
    """Parameters of :func:`multislerp` (mergekit's ``multislerp``)."""

    weight: Annotated[float, PER_MODEL] = Field(
        1.0, description="the model's weight (mergekit requires it; modelfuse defaults to 1)"
    )
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0.0, description="small constant for numerical stability")


def multislerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Sequence[float] | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    r"""Weighted spherical average of N tensors: barycentric interpolation on the sphere.

    With :math:`x_i` the flattened tensors (task vectors :math:`\theta_i - \theta_b`
    when a base is given), norms :math:`n_i`, unit vectors
    :math:`u_i = x_i / (n_i + \epsilon)` and weights :math:`w_i` (divided by
    their sum when ``normalize_weights``): the weighted mean direction
    :math:`\hat m = m / \lVert m \rVert`, :math:`m = \sum_i w_i u_i`, is the point
    of the sphere at which the weighted tangent vectors
    :math:`\sum_i w_i (u_i - (u_i \cdot \hat m)\hat m)` cancel, so the
    exponential map of their sum returns :math:`\hat m` itself, and

    .. math:: \theta = (\theta_b) + \hat m \sum_i w_i n_i .

    When :math:`\lVert m \rVert < \epsilon` (antipodal tensors whose weights
    balance, or all-zero task vectors) no direction is defined: two models,
    or all-zero inputs, give the linear combination :math:`\sum_i w_i x_i`;
    otherwise a :class:`~modelfuse.errors.DataError` asks for other weights.

    Parameters
    ----------
    tensors : sequence of Tensor
        The models' tensors of one name. Not modified.
    base : Tensor, optional
        Work in task-vector space around this tensor.
    weight : sequence of float, optional
        One weight per model (default 1).
    normalize_weights : bool, default True
        Divide the weights by their sum.
    eps : float, default 1e-8
        Stability constant, as in mergekit.

    Returns
    -------
    Tensor
        float32; a single model's tensor is returned as it is.

    References
    ----------
    Goddard, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea;
    Buss and Fillmore, "Spherical averages and applications to spherical splines
    and interpolation", ACM Transactions on Graphics 2001.

    Examples
    --------
    >>> a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    >>> multislerp([a, b])
    tensor([2.1213, 2.1213])
    """
    n = len(tensors)
    if n == 0:
        raise ConfigError("multislerp: no models to merge; give at least one")
    weights = [1.0] * n if weight is None else [float(w) for w in weight]
    if len(weights) != n:
        raise ConfigError(f"multislerp: {len(weights)} weights for {n} models; give one per model")
    if n == 1:
        return tensors[0].to(torch.float32).clone()
    if normalize_weights:
        total = sum(weights)
        if abs(total) < 1e-12:
            raise ConfigError(
                f"multislerp: the weights {weights} sum to zero, so they cannot be normalized; "
                "change them or set normalize_weights: false"
            )
        weights = [w / total for w in weights]
    # Inputs stay in their dtype; each chunk is converted to float32 as it is used.
    flats = [t.reshape(-1) for t in tensors]
    origin = None if base is None else base.reshape(-1)
    size = flats[0].numel()
    chunk = max(1, min(size, _CHUNK))
    scratch = torch.empty(chunk, dtype=torch.float32)

    def point(i: int, index: slice) -> torch.Tensor:
        """Model i's entries at ``index`` (minus the base); may be a view of the input."""
        if origin is None:
            return flats[i][index].to(torch.float32)
        return torch.sub(
            flats[i][index].to(torch.float32),
            origin[index].to(torch.float32),
            out=scratch[: index.stop - index.start],
        )

    def norm(values: Iterable[torch.Tensor]) -> float:
        # float32 per chunk, summed in double: accurate without converting the data
        return sum(float(torch.linalg.vector_norm(v)) ** 2 for v in values) ** 0.5

    slices = [slice(a, min(size, a + chunk)) for a in range(0, size, chunk)]
    norms = [norm(point(i, index) for index in slices) for i in range(n)]
    mean = torch.zeros(size, dtype=torch.float32)
    for index in slices:
        for i in range(n):  # unit vector, then weight: antipodal pairs cancel exactly
            unit = torch.div(
                point(i, index), norms[i] + eps, out=scratch[: index.stop - index.start]
            )
            mean[index].add_(unit.mul_(weights[i]))
    mean_norm = norm(mean[index] for index in slices)
    if mean_norm < eps:
        if not (n == 2 or all(v < eps for v in norms)):
            raise DataError(
                "multislerp: the weighted mean of the models' directions is zero (antipodal "
                f"tensors whose weights {weights} balance), so no spherical average exists; "
                "change the weights"
            )
        result = mean.zero_()
        for index in slices:
            for i in range(n):
                result[index].add_(point(i, index), alpha=weights[i])
    else:
        result = mean.mul_(sum(w * v for w, v in zip(weights, norms)) / mean_norm)
    if origin is not None:
        for index in slices:  # chunk by chunk: a whole bfloat16 base is never widened at once
            result[index].add_(origin[index].to(torch.float32))
    return result.reshape(tensors[0].shape)
