"""RegMean: each linear layer merged by the least-squares fit of the models' outputs."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import MethodParameters
from modelfuse.merge.statistics_tensors import collect_statistics

__all__ = ["RegMeanJitterWarning", "RegMeanParameters", "regmean"]


class RegMeanJitterWarning(UserWarning):
    """The summed Gram matrix of a layer was singular; a jitter was added to solve."""


class RegMeanParameters(MethodParameters):
    """Parameters of :func:`regmean`."""

    alpha: float = Field(
        0.1,
        ge=0,
        le=1,
        description="scale of the off-diagonal Gram entries (1: exact least squares, "
        "0: diagonal only); reference configurations use 0.1",
    )


def _solve(
    gram: torch.Tensor, rhs: torch.Tensor, mean: torch.Tensor, name: str | None
) -> torch.Tensor:
    """Solve ``gram @ X = rhs``; if ``gram`` is singular, add a growing jitter (see :func:`regmean`)."""
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, factor)
        if bool(torch.isfinite(solution).all()):
            return solution
    scale = float(gram.diagonal().mean())
    if not scale > 0 or not torch.isfinite(torch.tensor(scale)):
        scale = 1.0
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    for exponent in range(-10, 1):
        jitter = scale * 10.0**exponent
        factor, info = torch.linalg.cholesky_ex(gram + jitter * eye)
        if int(info) != 0:
            continue
        solution = torch.cholesky_solve(rhs + jitter * mean, factor)
        if not bool(torch.isfinite(solution).all()):
            continue
        warnings.warn(
            f"regmean: tensor {name}: the summed Gram matrix ({gram.shape[0]}x{gram.shape[0]}) is "
            f"singular; solved with jitter {jitter:.3g} (1e{exponent} times its mean diagonal) "
            "added to the diagonal, which pulls the directions the data does not reach towards "
            "the plain average",
            RegMeanJitterWarning,
            stacklevel=4,
        )
        return solution
    raise ConfigError(
        f"regmean: tensor {name}: the summed Gram matrix cannot be factorised even with a "
        "jitter as large as its mean diagonal; do the Gram matrices hold NaN or inf values? "
        "Recompute the statistics"
    )


def regmean(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    statistics: Mapping[str, Sequence[torch.Tensor | None]] | None = None,
    alpha: float = 0.1,
    name: str | None = None,
) -> torch.Tensor:
    r"""RegMean: :math:`W^* = \big(\sum_i \tilde G_i\big)^{-1} \sum_i \tilde G_i W_i^\top`.

    For a linear layer :math:`y = W x` (``nn.Linear`` stores :math:`W` as
    ``(out_features, in_features)``) and the Gram matrix :math:`G_i = X_i^\top
    X_i / n_i` of model i's layer inputs, :math:`W^{*\top}` minimises
    :math:`\sum_i \|X_i W^\top - X_i W_i^\top\|^2 / n_i`: the merged layer
    reproduces every model's outputs on its own data as well as one layer can.
    :math:`\tilde G_i = \alpha G_i + (1 - \alpha) \operatorname{diag}(G_i)`
    keeps the diagonal and scales the off-diagonal entries by :math:`\alpha`,
    which regularises the solution towards the plain average (:math:`\alpha =
    0` gives a per-input-feature weighted average). The merged weight is
    :math:`W^*` transposed back to ``(out, in)``.

    Parameters
    ----------
    tensors : sequence of Tensor
        The models' tensors of one name. Not modified.
    base : Tensor, optional
        Unused; accepted so that every method has the same signature.
    statistics : dict, optional
        ``{"gram": [G_1, ..., G_n]}``: for a linear weight of shape
        ``(out, in)``, each model's ``(in, in)`` Gram matrix, as written by
        :func:`modelfuse.statistics.gram_matrices` under the weight's name.
        Tensors no model has a Gram matrix for (biases, embeddings, norms) are
        averaged; a Gram matrix for some models only is an error.
    alpha : float, default 0.1
        Scale of the off-diagonal entries, in [0, 1].
    name : str, optional
        The tensor's name, for messages.

    Returns
    -------
    Tensor
        float32 (the solve runs in float64).

    Warns
    -----
    RegMeanJitterWarning
        When :math:`\sum_i \tilde G_i` is singular (inputs confined to a
        subspace, e.g. a dead feature). Then, for the smallest
        :math:`\epsilon = 10^{k} \cdot \mathrm{mean\,diag}` (k = -10, ..., 0) that
        lets the Cholesky factorisation succeed, modelfuse solves
        :math:`(\sum_i \tilde G_i + \epsilon I) W^{*\top} = \sum_i \tilde G_i
        W_i^\top + \epsilon \bar W^\top` with :math:`\bar W` the plain average:
        the jitter on the diagonal, balanced on the right-hand side so that
        directions no input reaches take the average instead of shrinking to 0.
        The warning names the tensor and :math:`\epsilon`.

    Raises
    ------
    ConfigError
        A Gram matrix of the wrong shape, a Gram matrix for a tensor that is
        not 2-D, Gram matrices for some models only, or a system that cannot
        be solved at all (NaN in the statistics).

    References
    ----------
    Jin et al., "Dataless knowledge fusion by merging weights of language
    models", ICLR 2023 (alpha = 0.1 in the reference configurations).

    Examples
    --------
    >>> w1, w2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    >>> g1, g2 = torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([1.0, 3.0]))
    >>> regmean([w1, w2], statistics={"gram": [g1, g2]})
    tensor([[0.7500, 0.7500]])
    """
    n = len(tensors)
    if n == 0:
        raise ConfigError("regmean: no tensors to merge; give at least one model")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"regmean: alpha must be in [0, 1], got {alpha}")
    first = tensors[0]
    if first.dim() != 2:
        if any(g is not None for g in (statistics or {}).get("gram", [])):
            raise ConfigError(
                f"regmean: tensor {name} has shape {list(first.shape)} but has Gram matrices; "
                "Gram matrices belong to 2-D linear weights (out_features, in_features)"
            )
        return torch.stack([t.to(torch.float32) for t in tensors]).mean(0)
    in_features = int(first.shape[1])
    grams = collect_statistics(
        statistics, "gram", n, method="regmean", name=name, shape=(in_features, in_features)
    )
    if grams is None:
        return torch.stack([t.to(torch.float32) for t in tensors]).mean(0)
    total = torch.zeros(in_features, in_features, dtype=torch.float64)
    rhs = torch.zeros(in_features, int(first.shape[0]), dtype=torch.float64)
    mean = torch.zeros_like(rhs)
    for tensor, gram in zip(tensors, grams):
        g = gram.to(torch.float64)
        g = g * alpha + torch.diag(g.diagonal()) * (1.0 - alpha)
        w_t = tensor.to(torch.float64).T
        total.add_(g)
        rhs.addmm_(g, w_t)
        mean.add_(w_t, alpha=1.0 / n)
    solution = _solve(total, rhs, mean, name)
    return solution.T.to(torch.float32).contiguous()
