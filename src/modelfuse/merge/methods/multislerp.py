"""Spherical averaging of N models (mergekit's ``multislerp``), optionally of task vectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from modelfuse.errors import ConfigError, DataError
from modelfuse.merge.parameters import PER_MODEL, MethodParameters

__all__ = ["MultiSlerpParameters", "multislerp", "point_gram"]

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
    gram: torch.Tensor | None = None,
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
    gram : Tensor, optional
        :func:`point_gram` of the whole tensors, when the inputs are a block of
        rows of them (the engine's row blocks); computed from the inputs when
        not given. The norms :math:`n_i` and :math:`\lVert m \rVert` both
        follow from it, so one pass over the data is enough.

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
    if gram is None:
        gram = point_gram(tensors, base)
    gram = gram.to(torch.float64)
    norms = [float(v) for v in torch.diagonal(gram).clamp(min=0).sqrt()]
    # m = sum_i c_i x_i with c_i = w_i / (n_i + eps); |m|^2 = c^T G c
    c = torch.tensor([w / (v + eps) for w, v in zip(weights, norms)], dtype=torch.float64)
    mean_norm = float((c @ gram @ c).clamp(min=0).sqrt())
    if mean_norm < eps:
        if not (n == 2 or all(v < eps for v in norms)):
            raise DataError(
                "multislerp: the weighted mean of the models' directions is zero (antipodal "
                f"tensors whose weights {weights} balance), so no spherical average exists; "
                "change the weights"
            )
        coefficients = list(weights)  # the linear combination
    else:
        scale = sum(w * v for w, v in zip(weights, norms)) / mean_norm
        coefficients = [float(ci) * scale for ci in c]
    # Inputs stay in their dtype; each chunk is converted to float32 as it is used.
    flats = [t.reshape(-1) for t in tensors]
    origin = None if base is None else base.reshape(-1)
    size = flats[0].numel()
    # theta_b + sum_i c_i (theta_i - theta_b) = (1 - sum_i c_i) theta_b + sum_i c_i theta_i:
    # one weighted sum, chunk by chunk
    out = torch.empty(size, dtype=torch.float32)
    for index in _slices(size):
        part = out[index]
        if origin is None:
            part.zero_()
        else:
            torch.mul(origin[index].to(torch.float32), 1.0 - sum(coefficients), out=part)
        for i in range(n):
            part.add_(flats[i][index].to(torch.float32), alpha=coefficients[i])
    return out.reshape(tensors[0].shape)


def _slices(size: int) -> list[slice]:
    chunk = max(1, min(size, _CHUNK))
    return [slice(a, min(size, a + chunk)) for a in range(0, size, chunk)]


def point_gram(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    r"""``[n, n]`` float64: the dot products :math:`x_i \cdot x_j` of the points averaged.

    :math:`x_i` is the model's tensor, or its task vector when ``base`` is
    given. Sums over blocks of rows add up to the whole tensor's, so the
    engine can compute it block by block and merge each block with
    :func:`multislerp`.

    Examples
    --------
    >>> point_gram([torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])])
    tensor([[25.,  4.],
            [ 4.,  1.]], dtype=torch.float64)
    """
    n = len(tensors)
    flats = [t.reshape(-1) for t in tensors]
    origin = None if base is None else base.reshape(-1)
    gram = torch.zeros(n, n, dtype=torch.float64)
    if n == 0:
        return gram
    for index in _slices(flats[0].numel()):
        points = torch.stack([f[index].to(torch.float32) for f in flats])
        if origin is not None:
            points.sub_(origin[index].to(torch.float32))
        gram += (points @ points.T).double()  # float32 per chunk, summed in double
    return gram
