"""Model Stock: move the average of fine-tuned models toward the base by their angle."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import MethodParameters

__all__ = ["ModelStockParameters", "PairwiseMean", "model_stock", "task_vector_gram"]

PairwiseMean = Literal["cosine", "angle"]

_MIN_DENOMINATOR = 1e-6
_CHUNK = 1 << 18


class ModelStockParameters(MethodParameters):
    """Parameters of :func:`model_stock` (mergekit's ``model_stock``)."""

    filter_wise: bool = Field(
        False, description="one ratio per output row (filter) instead of one per tensor"
    )
    pairwise_mean: PairwiseMean = Field(
        "cosine",
        description="for more than two models: the mean of the pairwise cosines ('cosine', "
        "as mergekit) or the cosine of the mean pairwise angle ('angle')",
    )


def model_stock(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    filter_wise: bool = False,
    pairwise_mean: PairwiseMean = "cosine",
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Model Stock: :math:`\theta = t\,\bar\theta + (1 - t)\,\theta_b`,
    :math:`t = N\cos\phi / (1 + (N-1)\cos\phi)`.

    :math:`\bar\theta` is the mean of the N fine-tuned tensors and
    :math:`\cos\phi` the cosine between their task vectors
    :math:`\tau_i = \theta_i - \theta_b` (norm products clamped at 1e-6): for
    N = 2 the one cosine, for N > 2 the mean of the pairwise cosines
    (``"cosine"``) or the cosine of the mean pairwise angle (``"angle"``).
    Where :math:`1 + (N-1)\cos\phi \le 10^{-6}` (task vectors pointing in
    opposite directions) the ratio is undefined and the base is kept
    (:math:`t = 0`).

    Parameters
    ----------
    tensors : sequence of Tensor
        N >= 2 fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base (pre-trained) model's tensor.
    filter_wise : bool, default False
        One ratio per output row (a tensor of two or more dimensions viewed as
        ``[shape[0], -1]``; a 1-D tensor is one row) instead of one for the
        whole tensor.
    pairwise_mean : {"cosine", "angle"}, default "cosine"
        How the pairwise angles of N > 2 models are averaged.
    gram : Tensor, optional
        :func:`task_vector_gram` of the whole tensors, when the inputs are a
        block of rows of them (the engine's row blocks; not with
        ``filter_wise``); computed from the inputs when not given.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Jang, Yun and Han, "Model Stock: all we need is just a few fine-tuned models",
    ECCV 2024. https://arxiv.org/abs/2403.19522

    Examples
    --------
    >>> base = torch.zeros(2)
    >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # orthogonal: t = 0
    >>> model_stock([a, b], base)
    tensor([0., 0.])
    >>> model_stock([a, a], base)  # parallel: t = 1
    tensor([1., 0.])
    """
    n = _check(tensors, base, pairwise_mean)
    if base is None:  # checked above; for type checkers
        raise ConfigError("model_stock needs a base model; set base_model")
    # Inputs stay in their dtype; each block is converted to float32 as it is used.
    rows = base.shape[0] if (filter_wise and base.dim() >= 2) else 1
    base_rows = base.reshape(rows, -1)
    model_rows = [t.reshape(rows, -1) for t in tensors]
    columns = base_rows.shape[1]
    out = torch.empty(base_rows.shape, dtype=torch.float32)
    if rows == 1:
        # One ratio for the whole tensor, from the task vectors' Gram matrix; then the
        # output is written chunk by chunk.
        if gram is None:
            gram = task_vector_gram(tensors, base)
        ratio = float(_ratio(gram.reshape(n, n, 1), n, pairwise_mean)[0])
        # (1 - t) base + t mean(theta_i): a weighted sum, without the task vectors
        for block in _column_blocks(columns):
            part = torch.mul(base_rows[block].to(torch.float32), 1.0 - ratio, out=out[block])
            for model in model_rows:
                part.add_(model[block].to(torch.float32), alpha=ratio / n)
    else:
        # One ratio per row: every block of rows is independent.
        step = max(1, _CHUNK // max(columns, 1))
        for a in range(0, rows, step):
            block = (slice(a, min(rows, a + step)), slice(None))
            taus = _task_vectors(model_rows, base_rows, block)
            ratio = _ratio(_gram(taus), n, pairwise_mean).float()
            torch.addcmul(base_rows[block], ratio.unsqueeze(-1), taus.mean(0), out=out[block])
    return out.reshape(base.shape)


def _check(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, pairwise_mean: str = "cosine"
) -> int:
    if base is None:
        raise ConfigError("model_stock needs a base model; set base_model")
    n = len(tensors)
    if n < 2:
        raise ConfigError(
            f"model_stock needs at least two fine-tuned models besides the base, got {n}"
        )
    if pairwise_mean not in ("cosine", "angle"):
        raise ConfigError(f"pairwise_mean: unknown value {pairwise_mean!r}; valid: cosine, angle")
    return n


def _column_blocks(columns: int) -> list[tuple[slice, slice]]:
    step = max(1, min(columns, _CHUNK))
    return [(slice(None), slice(a, min(columns, a + step))) for a in range(0, columns, step)]


def task_vector_gram(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    r"""``[n, n]`` float64: the dot products :math:`\tau_i \cdot \tau_j` of the task vectors.

    What Model Stock needs of a whole tensor (one ratio per tensor). Sums over
    blocks of rows add up to the whole tensor's, so the engine can compute it
    block by block and merge each block with :func:`model_stock`.

    Examples
    --------
    >>> base = torch.zeros(2)
    >>> task_vector_gram([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])], base)
    tensor([[1., 1.],
            [1., 2.]], dtype=torch.float64)
    """
    n = _check(tensors, base)
    if base is None:  # checked above; for type checkers
        raise ConfigError("model_stock needs a base model; set base_model")
    base_rows = base.reshape(1, -1)
    model_rows = [t.reshape(1, -1) for t in tensors]
    gram = torch.zeros(n, n, dtype=torch.float64)
    for block in _column_blocks(base_rows.shape[1]):
        gram += _gram(_task_vectors(model_rows, base_rows, block))[..., 0].double()
    return gram


def _task_vectors(
    model_rows: Sequence[torch.Tensor], base_rows: torch.Tensor, block: tuple[slice, slice]
) -> torch.Tensor:
    """``[n, rows, columns]``: the models' task vectors on a block."""
    taus = torch.stack([m[block].to(torch.float32) for m in model_rows])
    return taus.sub_(base_rows[block].to(torch.float32))


def _gram(taus: torch.Tensor) -> torch.Tensor:
    """``[n, n, rows]``: each row's Gram matrix of the task vectors (one batched matmul)."""
    return torch.einsum("irc,jrc->ijr", taus, taus)


def _ratio(gram: torch.Tensor, n: int, pairwise_mean: PairwiseMean) -> torch.Tensor:
    """Model Stock's t per row, from Gram matrices ``[n, n, rows]``."""
    gram = gram.double()
    norms = torch.diagonal(gram, dim1=0, dim2=1).clamp(min=0).sqrt().T  # [n, rows]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            product = (norms[i] * norms[j]).clamp(min=1e-6)
            cosines.append((gram[i, j] / product).clamp(-1.0, 1.0))
    pairs = torch.stack(cosines)
    cos = pairs.mean(0) if pairwise_mean == "cosine" else torch.cos(torch.arccos(pairs).mean(0))
    denominator = 1.0 + (n - 1) * cos
    defined = denominator > _MIN_DENOMINATOR
    return torch.where(
        defined, n * cos / denominator.clamp(min=_MIN_DENOMINATOR), torch.zeros_like(cos)
    )
