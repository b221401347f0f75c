"""Model Stock: move the average of fine-tuned models toward the base by their angle."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import MethodParameters

__all__ = ["ModelStockParameters", "PairwiseMean", "model_stock"]

PairwiseMean = Literal["cosine", "angle"]

_MIN_DENOMINATOR = 1e-6


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
    if base is None:
        raise ConfigError("model_stock needs a base model; set base_model")
    n = len(tensors)
    if n < 2:
        raise ConfigError(
            f"model_stock needs at least two fine-tuned models besides the base, got {n}"
        )
    if pairwise_mean not in ("cosine", "angle"):
        raise ConfigError(f"pairwise_mean: unknown value {pairwise_mean!r}; valid: cosine, angle")
    base32 = base.to(torch.float32)
    rows = base32.shape[0] if (filter_wise and base32.dim() >= 2) else 1
    taus = torch.stack([(t.to(torch.float32) - base32).reshape(rows, -1) for t in tensors])
    norms = torch.linalg.vector_norm(taus, dim=-1)  # [n, rows]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = (taus[i] * taus[j]).sum(-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    pairs = torch.stack(cosines)
    cos = pairs.mean(0) if pairwise_mean == "cosine" else torch.cos(torch.arccos(pairs).mean(0))
    denominator = 1.0 + (n - 1) * cos
    defined = denominator > _MIN_DENOMINATOR
    ratio = torch.where(
        defined, n * cos / denominator.clamp(min=_MIN_DENOMINATOR), torch.zeros_like(cos)
    )
    mean = taus.mean(0)  # mean(theta_i) - base, so theta = base + t * mean
    del taus
    return (base32.reshape(rows, -1) + ratio.unsqueeze(-1) * mean).reshape(base32.shape)
