"""NuSLERP: spherical interpolation of two models by their weights (mergekit's ``nuslerp``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import PER_MODEL, MethodParameters

__all__ = ["NuSlerpParameters", "nuslerp", "nuslerp_products"]

_MIN_NORM = 1e-7
"""Norms are clamped at this before the cosine is taken (mergekit's normalisation)."""

_COLINEAR = 1e-8
"""Below this ``|sin Ω|`` the two vectors are colinear and interpolated linearly."""

_CHUNK = 1 << 20
"""Entries converted to float32 at a time (whole rows of the 2-D view of a tensor)."""

Layout = Literal["flat", "last", "first"]


class NuSlerpParameters(MethodParameters):
    """Parameters of :func:`nuslerp` (mergekit's ``nuslerp``)."""

    weight: Annotated[float, PER_MODEL] = Field(
        1.0,
        description="the model's weight; t = w_2 / (w_1 + w_2) (mergekit requires it; "
        "modelfuse defaults to 1)",
    )
    nuslerp_flatten: bool = Field(
        True,
        description="one angle for the whole tensor (true), or one per vector (false; see "
        "nuslerp_row_wise)",
    )
    nuslerp_row_wise: bool = Field(
        False,
        description="without nuslerp_flatten: interpolate the vectors along the first "
        "dimension (true) instead of the last (false), as mergekit does",
    )


def _layout(tensor: torch.Tensor, flatten: bool, row_wise: bool) -> Layout:
    if flatten or tensor.dim() <= 1 or tensor.numel() == 0:
        return "flat"
    return "first" if row_wise else "last"


def _check(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
    if len(tensors) != 2:
        extra = " besides the base model" if base is not None else ""
        raise ConfigError(
            f"nuslerp interpolates between exactly two models{extra}; got {len(tensors)}"
        )


def _matrix(tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A 2-D view ``[rows, columns]``: the vectors are its columns ("flat": one column of
    every entry; "first": the tensor's vectors along its first dimension) or its rows
    ("last")."""
    if layout == "flat":
        return tensor.reshape(-1, 1)
    if layout == "first":
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.reshape(-1, tensor.shape[-1])


def _chunks(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, layout: Layout
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``(rows, v0, v1, base)`` chunk by chunk of rows of the 2-D views, in float32: inputs
    stay in their dtype and temporaries stay one chunk whatever the tensor size."""
    m0, m1 = _matrix(tensors[0], layout), _matrix(tensors[1], layout)
    mb = None if base is None else _matrix(base, layout)
    rows, columns = m0.shape
    step = max(1, _CHUNK // max(columns, 1))
    for start in range(0, rows, step):
        index = slice(start, min(rows, start + step))
        v0, v1 = m0[index].to(torch.float32), m1[index].to(torch.float32)
        reference = None
        if mb is not None:
            reference = mb[index].to(torch.float32)
            v0, v1 = v0 - reference, v1 - reference
        yield index, v0, v1, reference


def _column_products(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, layout: Layout
) -> torch.Tensor:
    """``[3, columns]`` float64: ``v0·v0, v1·v1, v0·v1`` of each column vector, float32 per
    chunk of rows summed in double."""
    total: torch.Tensor | None = None
    for _, v0, v1, _ in _chunks(tensors, base, layout):
        part = torch.stack([(v0 * v0).sum(0), (v1 * v1).sum(0), (v0 * v1).sum(0)]).double()
        total = part if total is None else total + part
    if total is None:  # no rows
        columns = _matrix(tensors[0], layout).shape[1]
        return torch.zeros(3, columns, dtype=torch.float64)
    return total


def nuslerp_products(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> torch.Tensor:
    r"""What NuSLERP needs of a whole tensor before merging a block of its rows.

    ``[3, 1]`` float64 (:math:`v_0 \cdot v_0, v_1 \cdot v_1, v_0 \cdot v_1`) when
    the whole tensor is one vector (``nuslerp_flatten``, or a 1-D tensor);
    ``[3, prod(shape[1:])]`` with ``nuslerp_row_wise`` (one vector per position
    along the first dimension); an empty tensor when the vectors lie along the
    last dimension, which a block of rows holds whole. Sums over blocks of rows
    add up to the whole tensor's.

    Examples
    --------
    >>> nuslerp_products([torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])])
    tensor([[25.],
            [ 1.],
            [ 4.]], dtype=torch.float64)
    """
    _check(tensors, base)
    layout = _layout(tensors[0], nuslerp_flatten, nuslerp_row_wise)
    if layout == "last":
        return torch.zeros(0, dtype=torch.float64)
    return _column_products(tensors, base, layout)


def _coefficients(products: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SLERP's two coefficients per vector (float64), linear where the vectors are colinear."""
    square_0, square_1, dot = products[0], products[1], products[2]
    norm_0 = square_0.clamp(min=0).sqrt().clamp(min=_MIN_NORM)
    norm_1 = square_1.clamp(min=0).sqrt().clamp(min=_MIN_NORM)
    omega = torch.arccos((dot / (norm_0 * norm_1)).clamp(-1.0, 1.0))
    sine = torch.sin(omega)
    colinear = sine.abs() < _COLINEAR
    safe = torch.where(colinear, torch.ones_like(sine), sine)
    c0 = torch.where(colinear, torch.full_like(sine, 1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    c1 = torch.where(colinear, torch.full_like(sine, t), torch.sin(t * omega) / safe)
    return c0, c1


def nuslerp(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Sequence[float] | None = None,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
    products: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Spherical interpolation between two models at :math:`t = w_2 / (w_1 + w_2)`.

    With :math:`v_0, v_1` the two models' tensors (their task vectors
    :math:`\theta_i - \theta_b` when a base is given) and
    :math:`t = w_2 / (w_1 + w_2)` (0.5 when :math:`|w_1 + w_2| < 10^{-6}`),
    for each vector:

    .. math::

        \cos\Omega = \frac{v_0 \cdot v_1}{\max(\lVert v_0\rVert, 10^{-7})\,
        \max(\lVert v_1\rVert, 10^{-7})}, \qquad
        \operatorname{slerp} = \frac{\sin((1-t)\Omega)}{\sin\Omega} v_0
        + \frac{\sin(t\Omega)}{\sin\Omega} v_1 ,

    the linear interpolation :math:`(1-t) v_0 + t v_1` where
    :math:`|\sin\Omega| < 10^{-8}`; with a base the result is
    :math:`\theta_b + \operatorname{slerp}`. The vectors are the whole flattened
    tensor (``nuslerp_flatten``, the default), else the tensor's vectors along
    its last dimension (one per output row of a linear layer), or along its
    first dimension with ``nuslerp_row_wise`` (mergekit's naming); a 1-D tensor
    is one vector in every mode.

    Parameters
    ----------
    tensors : sequence of Tensor
        Exactly two models' tensors. Not modified.
    base : Tensor, optional
        Interpolate the task vectors around this tensor.
    weight : sequence of float, optional
        The two models' weights (default 1 each: t = 0.5).
    nuslerp_flatten : bool, default True
        One angle for the whole tensor.
    nuslerp_row_wise : bool, default False
        Without ``nuslerp_flatten``: vectors along the first dimension.
    products : Tensor, optional
        :func:`nuslerp_products` of the whole tensors, when the inputs are a
        block of rows of them (the engine's row blocks); computed from the
        inputs when not given.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985;
    mergekit's ``nuslerp`` (Goddard et al., "Arcee's MergeKit: a toolkit for
    merging large language models", EMNLP 2024 Industry Track,
    https://arxiv.org/abs/2403.13257).

    Examples
    --------
    >>> a, b = torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    >>> nuslerp([a, b], weight=[1.0, 1.0], nuslerp_flatten=False)  # per row: 45 degrees
    tensor([[0.7071, 0.7071],
            [1.4142, 1.4142]])
    >>> nuslerp([a, b], weight=[3.0, 1.0])  # t = 0.25 of the angle, whole tensor
    tensor([[0.9239, 0.3827],
            [1.8478, 0.7654]])
    """
    _check(tensors, base)
    weights = [1.0, 1.0] if weight is None else [float(w) for w in weight]
    if len(weights) != len(tensors):
        raise ConfigError(
            f"nuslerp: {len(weights)} weights for {len(tensors)} models; give one per model"
        )
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    layout = _layout(tensors[0], nuslerp_flatten, nuslerp_row_wise)
    column_coefficients = None
    if layout != "last":
        if products is None:
            products = _column_products(tensors, base, layout)
        c0, c1 = _coefficients(products.to(torch.float64), t)
        column_coefficients = (c0.float().unsqueeze(0), c1.float().unsqueeze(0))
    out = torch.empty(tensors[0].shape, dtype=torch.float32)
    matrix = _matrix(out, layout)
    for index, v0, v1, reference in _chunks(tensors, base, layout):
        if column_coefficients is None:  # one vector per row: its own angle
            rows = torch.stack([(v0 * v0).sum(1), (v1 * v1).sum(1), (v0 * v1).sum(1)]).double()
            c0, c1 = _coefficients(rows, t)
            k0, k1 = c0.float().unsqueeze(1), c1.float().unsqueeze(1)
        else:
            k0, k1 = column_coefficients
        part = matrix[index]
        # never in place on v0 or v1: they may be views of the caller's float32 tensors
        torch.mul(v0, k0, out=part).addcmul_(v1, k1)
        if reference is not None:
            part.add_(reference)
    return out
