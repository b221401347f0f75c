"""Uncertainty-based gradient matching: task vectors weighted by Fisher precisions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import PER_MODEL, MethodParameters
from modelfuse.merge.statistics_tensors import collect_statistics

__all__ = ["GradientMatchingParameters", "gradient_matching"]

_BLOCK = 1 << 20  # entries merged at a time


class GradientMatchingParameters(MethodParameters):
    """Parameters of :func:`gradient_matching`."""

    weight: Annotated[float, PER_MODEL] = Field(
        1.0, ge=0, description="alpha_i, the scale of the model's precision H_i (non-negative)"
    )
    prior_precision: float = Field(
        0.0,
        ge=0,
        description="H_0 = prior_precision * I, the base model's precision; larger values "
        "keep the merge closer to the base",
    )
    fisher_floor: float = Field(
        1e-6, ge=0, description="lower bound applied to every Fisher entry H_i"
    )


def gradient_matching(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    statistics: Mapping[str, Sequence[torch.Tensor | None]] | None = None,
    weight: Sequence[float] | None = None,
    prior_precision: float = 0.0,
    fisher_floor: float = 1e-6,
    name: str | None = None,
) -> torch.Tensor:
    r"""Uncertainty-based merge: :math:`\theta_b + (\sum_i \alpha_i H_i + H_0)^{-1} \sum_i \alpha_i H_i \tau_i`.

    With :math:`\tau_i = \theta_i - \theta_b` the task vectors and :math:`H_i`
    diagonal precisions (the models' Fisher diagonals, bounded below by
    ``fisher_floor``), everything is entry-wise. :math:`H_0 = \delta I` is the
    precision of the base model, a scalar ``prior_precision`` here (the engine
    carries statistics for the input models only, not for the base): it plays
    the part of the pre-training prior, shrinking every task vector towards
    the base where the models' Fishers are small compared to :math:`\delta`.

    Special cases: with :math:`\delta = 0` the result is Fisher-weighted
    averaging :math:`\sum_i \alpha_i H_i \theta_i / \sum_i \alpha_i H_i`; with
    equal constant precisions :math:`H_i = h` and :math:`\delta = h (1/\lambda -
    \sum_i \alpha_i)` it is task arithmetic :math:`\theta_b + \lambda \sum_i
    \alpha_i \tau_i`.

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base (pre-trained) model's tensor.
    statistics : dict, optional
        ``{"fisher": [F_1, ..., F_n]}``, one Fisher diagonal per model. When no
        model has one for this tensor (a buffer), every :math:`H_i` is taken
        as 1 and :math:`\delta` as 0, giving the :math:`\alpha`-weighted
        average; when only some do, an error.
    weight : sequence of float, optional
        :math:`\alpha_i \ge 0`, one per model (default 1), scaling each
        model's precision in both sums; not all zero.
    prior_precision : float, default 0.0
        :math:`\delta`, in the units of the Fisher entries.
    fisher_floor : float, default 1e-6
        Lower bound of every Fisher entry.
    name : str, optional
        The tensor's name, for messages.

    Returns
    -------
    Tensor
        float32.

    Raises
    ------
    ConfigError
        No base, weights not one per model or all zero, or Fisher tensors of
        another shape, missing for some models, or negative.

    References
    ----------
    Daheim, Möllenhoff, Ponti, Gurevych and Khan, "Model merging by
    uncertainty-based gradient matching", ICLR 2024.

    Examples
    --------
    >>> base = torch.tensor([0.0, 0.0])
    >>> a, b = torch.tensor([2.0, 2.0]), torch.tensor([4.0, 0.0])
    >>> h = [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0])]
    >>> gradient_matching([a, b], base, statistics={"fisher": h}, prior_precision=2.0)
    tensor([1.5000, 0.3333])
    """
    if base is None:
        raise ConfigError("gradient_matching needs a base model; set base_model")
    n = len(tensors)
    if n == 0:
        raise ConfigError("gradient_matching: no models besides the base; give at least one")
    weights = [1.0] * n if weight is None else [float(w) for w in weight]
    if len(weights) != n:
        raise ConfigError(
            f"gradient_matching: {len(weights)} weights for {n} models; give one weight per model"
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"gradient_matching: weights must be non-negative and not all zero, got {weights}"
        )
    shape = tuple(base.shape)
    fishers = collect_statistics(
        statistics, "fisher", n, method="gradient_matching", name=name, shape=shape
    )
    base32 = base.to(torch.float32)
    if fishers is None:
        delta = torch.zeros(shape, dtype=torch.float32)
        for tensor, w in zip(tensors, weights):
            delta.add_(tensor.to(torch.float32) - base32, alpha=w)
        return base32 + delta.div_(sum(weights))
    for i, f in enumerate(fishers):
        if f.numel() and float(f.min()) < 0:
            raise ConfigError(
                f"gradient_matching: tensor {name}: the Fisher of model {i} has negative entries "
                f"(minimum {float(f.min()):g}); a Fisher diagonal is a mean of squares, so check "
                "the statistics file"
            )
    flat_base = base32.reshape(-1)
    flat_tensors = [t.reshape(-1) for t in tensors]
    flat_fishers = [f.reshape(-1) for f in fishers]
    out = torch.empty(flat_base.numel(), dtype=torch.float32)
    # Block by block, so that temporaries stay small whatever the tensor's size.
    for start in range(0, out.numel(), _BLOCK):
        stop = min(out.numel(), start + _BLOCK)
        b = flat_base[start:stop]
        numerator = torch.zeros(stop - start, dtype=torch.float32)
        precision = torch.full((stop - start,), float(prior_precision), dtype=torch.float32)
        for t, f, w in zip(flat_tensors, flat_fishers, weights):
            h = f[start:stop].clamp_min(fisher_floor).mul_(w)
            precision.add_(h)
            numerator.addcmul_(h, t[start:stop].to(torch.float32) - b)
        # precision > 0 unless fisher_floor = prior_precision = 0 and every Fisher vanishes
        # there: then no model carries information and the entry stays at the base.
        safe = torch.where(precision > 0, precision, torch.ones_like(precision))
        out[start:stop] = b + numerator / safe
    return out.reshape(shape)
