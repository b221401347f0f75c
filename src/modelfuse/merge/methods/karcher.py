"""The Karcher (Riemannian) mean of the models on the sphere (mergekit's ``karcher``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.methods.multislerp import point_gram
from modelfuse.merge.parameters import MethodParameters

__all__ = ["KarcherParameters", "karcher", "karcher_coefficients", "karcher_gram"]

_CHUNK = 1 << 18
"""Entries processed at once; temporaries stay one chunk whatever the tensor size."""

_MIN_SINE = 1e-7
"""A model at angle θ with sin θ below this from the current mean is antipodal to it
(θ ≈ π): its tangent direction is undefined and it adds no step."""


class KarcherParameters(MethodParameters):
    """Parameters of :func:`karcher` (mergekit's ``karcher``)."""

    max_iter: int = Field(10, ge=0, le=100_000, description="largest number of iterations")
    tol: float = Field(
        1e-5,
        ge=0.0,
        description="convergence tolerance: the iteration stops once the tangent step is "
        "shorter; norms and angles below it count as zero",
    )


def _points(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> list[torch.Tensor]:
    """The tensors averaged: the models', then the base's when one is given (as mergekit
    adds the base model to the models it gathers)."""
    points = list(tensors) + ([] if base is None else [base])
    if not points:
        raise ConfigError("karcher: no models to merge; give at least one")
    return points


def karcher_gram(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    r"""``[n, n]`` float64: the dot products :math:`x_i \cdot x_j` of the points averaged.

    The points are the models' tensors and, when given, the base's (last).
    Sums over blocks of rows add up to the whole tensor's, so the engine can
    compute it block by block and merge each block with :func:`karcher`.

    Examples
    --------
    >>> karcher_gram([torch.tensor([3.0, 4.0])], torch.tensor([0.0, 1.0]))
    tensor([[25.,  4.],
            [ 4.,  1.]], dtype=torch.float64)
    """
    return point_gram(_points(tensors, base))


def karcher_coefficients(
    gram: torch.Tensor, *, max_iter: int = 10, tol: float = 1e-5
) -> list[float]:
    r"""The Karcher mean as coefficients of the points: :math:`\theta = \sum_i c_i x_i`.

    Every iterate of the algorithm (see :func:`karcher`) is a combination of the
    unit vectors :math:`\hat x_i = x_i / n_i`, and every quantity it needs (dot
    products with the iterate, the length of the tangent step) is a quadratic
    form in the Gram matrix :math:`G_{ij} = x_i \cdot x_j`; so the iteration runs
    on coefficient vectors of length n, in float64, without touching the tensors.

    Parameters
    ----------
    gram : Tensor
        ``[n, n]`` Gram matrix of the points (:func:`karcher_gram`).
    max_iter : int, default 10
        Largest number of iterations.
    tol : float, default 1e-5
        Points of norm at most ``tol`` take no part in the direction; the
        iteration stops when the tangent step is shorter than ``tol``; points
        closer than ``tol`` (in angle) to the iterate add no step.

    Returns
    -------
    list of float
        One coefficient per point (0 for points of norm at most ``tol``).

    Examples
    --------
    >>> gram = torch.tensor([[4.0, 0.0], [0.0, 16.0]], dtype=torch.float64)  # orthogonal
    >>> [round(c, 4) for c in karcher_coefficients(gram)]  # mean norm 3, at 45 degrees
    [1.0607, 0.5303]
    """
    matrix = gram.detach().to(torch.float64).cpu().numpy()
    n = matrix.shape[0]
    norms = np.sqrt(np.clip(np.diagonal(matrix), 0.0, None))
    scale = float(norms.sum()) / n  # equal weights 1/n, every point counted (zeros too)
    valid = np.flatnonzero(norms > tol)
    coefficients = [0.0] * n
    if valid.size == 0:
        return coefficients
    inverse = 1.0 / norms[valid]
    unit_gram = matrix[np.ix_(valid, valid)] * inverse[:, None] * inverse[None, :]
    k = valid.size
    alphas = np.full(k, 1.0 / k)

    def length(c: np.ndarray) -> float:
        return math.sqrt(max(float(c @ unit_gram @ c), 0.0))

    # Start: the normalized mean of the unit vectors (the first unit vector if it is ~0).
    c = alphas.copy()
    start = length(c)
    if start < tol:
        c = np.zeros(k)
        c[0] = 1.0
    else:
        c = c / start
    for _ in range(max_iter):
        dots = np.clip(unit_gram @ c, -1.0, 1.0)
        angles = np.arccos(dots)
        sines = np.sin(angles)
        # the log map of unit vector i at the iterate u: angle / sin(angle) times its
        # component orthogonal to u, x_i - (x_i . u) u; nothing from points within tol
        # of u, or antipodal to it (no direction defined)
        moving = (angles >= tol) & (sines >= _MIN_SINE)
        factors = np.where(moving, alphas * angles / np.where(moving, sines, 1.0), 0.0)
        step = factors - float(factors @ dots) * c
        step_length = length(step)
        if step_length < tol:
            break
        # the exponential map back onto the sphere
        c = math.cos(step_length) * c + (math.sin(step_length) / step_length) * step
        size = length(c)
        if size > tol:
            c = c / size
    for j, i in enumerate(valid):
        coefficients[int(i)] = scale * float(c[j]) / float(norms[i])
    return coefficients


def karcher(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The Karcher mean of the tensors on the sphere, scaled by their mean norm.

    Each tensor (the models', and the base model's when one is given, as
    mergekit averages every model it reads) is one flat vector :math:`x_i`,
    :math:`i = 1..n`, with norm :math:`n_i` and direction
    :math:`\hat x_i = x_i / n_i`. The direction :math:`u` of the result is the
    Riemannian (Karcher) mean of the :math:`\hat x_i` with equal weights: the
    point of the sphere minimising :math:`\sum_i \arccos(u \cdot \hat x_i)^2`,
    found by Riemannian gradient descent. From :math:`u_0 = \bar x / \lVert \bar x
    \rVert`, :math:`\bar x = \frac1n \sum_i \hat x_i`, each step takes

    .. math::

        T = \frac1n \sum_i \frac{\theta_i}{\sin\theta_i}
            \left(\hat x_i - \cos\theta_i\, u\right),
        \qquad \theta_i = \arccos(u \cdot \hat x_i),

    .. math:: u \leftarrow \cos\lVert T\rVert\, u + \sin\lVert T\rVert\, T / \lVert T\rVert ,

    until :math:`\lVert T\rVert <` ``tol`` or ``max_iter`` steps. The result is
    :math:`\theta = u \cdot \frac1n \sum_i n_i`. Tensors of norm at most ``tol``
    count in the mean norm but not in the direction; if every tensor is that
    small the result is zero.

    The iteration runs on the tensors' Gram matrix (see
    :func:`karcher_coefficients`), so the tensors are read twice (dot
    products, then one weighted sum) and a large tensor is merged in blocks of
    rows once its Gram matrix is known.

    Parameters
    ----------
    tensors : sequence of Tensor
        The models' tensors of one name. Not modified.
    base : Tensor, optional
        The base model's tensor, averaged as one more point.
    max_iter : int, default 10
        Largest number of iterations.
    tol : float, default 1e-5
        Convergence tolerance (see above).
    gram : Tensor, optional
        :func:`karcher_gram` of the whole tensors, when the inputs are a block
        of rows of them (the engine's row blocks); computed from the inputs
        when not given.

    Returns
    -------
    Tensor
        float32; a single tensor is returned as it is.

    References
    ----------
    Karcher, "Riemannian center of mass and mollifier smoothing", Communications
    on Pure and Applied Mathematics 30(5), 1977; Buss and Fillmore, "Spherical
    averages and applications to spherical splines and interpolation", ACM
    Transactions on Graphics 2001. https://en.wikipedia.org/wiki/Karcher_mean

    Examples
    --------
    >>> a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    >>> karcher([a, b])  # the bisector, at the mean norm 3
    tensor([2.1213, 2.1213])
    >>> c = torch.tensor([1.0, 0.0])
    >>> karcher([a, b], c).norm()  # with a base: three points, mean norm 7/3
    tensor(2.3333)
    """
    points = _points(tensors, base)
    if len(points) == 1:
        return points[0].to(torch.float32).clone()
    if gram is None:
        gram = karcher_gram(tensors, base)
    coefficients = karcher_coefficients(gram, max_iter=int(max_iter), tol=float(tol))
    flats = [p.reshape(-1) for p in points]
    size = flats[0].numel()
    out = torch.empty(size, dtype=torch.float32)
    # One weighted sum, chunk by chunk; inputs stay in their dtype.
    for start in range(0, size, _CHUNK):
        part = out[start : start + _CHUNK].zero_()
        for flat, coefficient in zip(flats, coefficients):
            if coefficient != 0.0:
                part.add_(flat[start : start + _CHUNK].to(torch.float32), alpha=coefficient)
    return out.reshape(points[0].shape)
