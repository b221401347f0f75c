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
        1.0, ge=0, description="alpha_t, the scale of the model's precision H_t (non-negative)"
    )
    dataset_size: Annotated[float, PER_MODEL] = Field(
        1.0,
        ge=0,
        description="N_t, the number of examples the model was fine-tuned on: H_t = N_t * F_t "
        "for a Fisher F_t that is a mean over examples",
    )
    base_dataset_size: float = Field(
        1.0,
        ge=0,
        description="N_0, the number of examples behind the base model's Fisher F_0 "
        "(base_statistics): H_0 = N_0 * F_0 + prior_precision",
    )
    prior_precision: float = Field(
        0.0,
        ge=0,
        description="delta, added to H_0 as delta * I (the whole of H_0 without a base "
        "Fisher); larger values move the merge from Fisher averaging towards task arithmetic "
        "(towards the base with fine_tuning_prior false)",
    )
    fine_tuning_prior: bool = Field(
        True,
        description="true (the paper's assumption): each model was fine-tuned under the prior "
        "H_0, so its task vector is weighted by H_0 + H_t; false: by H_t alone (models "
        "fine-tuned to a stationary point of their own loss)",
    )
    fisher_floor: float = Field(
        1e-6, ge=0, description="lower bound applied to every entry of the models' Fishers F_t"
    )


def gradient_matching(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    statistics: Mapping[str, Sequence[torch.Tensor | None]] | None = None,
    weight: Sequence[float] | None = None,
    dataset_size: Sequence[float] | None = None,
    base_dataset_size: float = 1.0,
    prior_precision: float = 0.0,
    fine_tuning_prior: bool = True,
    fisher_floor: float = 1e-6,
    name: str | None = None,
) -> torch.Tensor:
    r"""Uncertainty-based gradient matching (Daheim et al., 2024), entry-wise.

    .. math::

        \theta = \theta_0 + \bar H^{-1} \sum_t \alpha_t (H_0 + H_t) \tau_t,
        \qquad \bar H = H_0 + \sum_t \alpha_t H_t,

    with :math:`\tau_t = \theta_t - \theta_0` the task vectors,
    :math:`H_t = N_t \max(F_t, \text{fisher\_floor})` the precision of model
    :math:`t` (its Fisher diagonal :math:`F_t`, a mean over examples, times its
    dataset size :math:`N_t`), and :math:`H_0 = N_0 F_0 + \delta` the precision
    of the pre-trained model (its Fisher :math:`F_0` when ``base_fisher`` is
    given, plus the scalar ``prior_precision`` :math:`\delta`). All matrices are
    diagonal, so everything is entry-wise.

    The formula is the stationary point of :math:`\sum_t \alpha_t \ell_t(\theta)
    + \tfrac12 \|\theta - \theta_0\|^2_{H_0}` when every task loss is replaced
    by its quadratic expansion at :math:`\theta_t` and each :math:`\theta_t`
    was fine-tuned under the same prior (:math:`\nabla \ell_t(\theta_t) = -H_0
    \tau_t`). With ``fine_tuning_prior=False`` the models are instead taken to
    be stationary points of their own losses (:math:`\nabla \ell_t(\theta_t) =
    0`) and each task vector is weighted by :math:`\alpha_t H_t` alone:
    :math:`\theta_0 + \bar H^{-1} \sum_t \alpha_t H_t \tau_t`.

    Special cases: with :math:`H_0 = \delta I` (no base Fisher) the prior is a
    scalar; with :math:`H_0 = 0` the result is Fisher-weighted averaging
    :math:`\sum_t \alpha_t H_t \theta_t / \sum_t \alpha_t H_t`; as
    :math:`H_t / H_0 \to 0` (``dataset_size`` 0) it is task arithmetic
    :math:`\theta_0 + \sum_t \alpha_t \tau_t`, and with equal isotropic
    precisions :math:`H_t = h I`, :math:`H_0 = h_0 I` and :math:`\sum_t
    \alpha_t = 1` it is the :math:`\alpha`-weighted average of the task vectors.

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base (pre-trained) model's tensor.
    statistics : dict, optional
        ``{"fisher": [F_1, ..., F_n]}``, one Fisher diagonal per model, and
        optionally ``"base_fisher": [F_0]``, the pre-trained model's (an entry
        None is no base Fisher). When no model has a Fisher for this tensor (a
        buffer), every :math:`H_t` is taken as 1 and :math:`H_0` as 0, giving
        the :math:`\alpha`-weighted average; when only some do, an error.
    weight : sequence of float, optional
        :math:`\alpha_t \ge 0`, one per model (default 1); not all zero.
    dataset_size : sequence of float, optional
        :math:`N_t \ge 0`, one per model (default 1: the Fishers are used as
        they are).
    base_dataset_size : float, default 1.0
        :math:`N_0 \ge 0`, the scale of the base Fisher.
    prior_precision : float, default 0.0
        :math:`\delta \ge 0`, in the units of :math:`H_t`.
    fine_tuning_prior : bool, default True
        Whether each model was fine-tuned under the prior :math:`H_0` (the
        paper's estimator); False weights each task vector by :math:`H_t` only.
    fisher_floor : float, default 1e-6
        Lower bound of every entry of the models' Fishers.
    name : str, optional
        The tensor's name, for messages.

    Returns
    -------
    Tensor
        float32.

    Raises
    ------
    ConfigError
        No base, weights or dataset sizes not one per model, weights all zero,
        or Fisher tensors of another shape, missing for some models, or
        negative.

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
    tensor([4.5000, 1.0000])
    >>> gradient_matching([a, b], base, statistics={"fisher": h}, prior_precision=2.0,
    ...                   fine_tuning_prior=False)
    tensor([1.5000, 0.3333])
    >>> f0 = [torch.tensor([1.0, 0.0])]
    >>> gradient_matching([a, b], base, statistics={"fisher": h, "base_fisher": f0},
    ...                   base_dataset_size=2.0)
    tensor([4.5000, 0.5000])
    """
    if base is None:
        raise ConfigError("gradient_matching needs a base model; set base_model")
    n = len(tensors)
    if n == 0:
        raise ConfigError("gradient_matching: no models besides the base; give at least one")
    weights = _per_model(weight, n, "weight")
    sizes = _per_model(dataset_size, n, "dataset_size")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"gradient_matching: weights must be non-negative and not all zero, got "
            f"{repr(weights)[:60]}"
        )
    if any(s < 0 for s in sizes) or base_dataset_size < 0 or prior_precision < 0:
        raise ConfigError(
            "gradient_matching: dataset_size, base_dataset_size and prior_precision must be "
            "non-negative"
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
    base_fisher = _base_fisher(statistics, name, shape)
    for i, f in enumerate(fishers):
        _non_negative(f, name, f"the Fisher of model {i}")
    flat_base = base32.reshape(-1)
    flat_tensors = [t.reshape(-1) for t in tensors]
    flat_fishers = [f.reshape(-1) for f in fishers]
    flat_f0 = None if base_fisher is None else base_fisher.reshape(-1)
    out = torch.empty(flat_base.numel(), dtype=torch.float32)
    # Block by block, so that temporaries stay small whatever the tensor's size.
    for start in range(0, out.numel(), _BLOCK):
        stop = min(out.numel(), start + _BLOCK)
        b = flat_base[start:stop]
        h0 = torch.full((stop - start,), float(prior_precision), dtype=torch.float32)
        if flat_f0 is not None:
            h0.add_(flat_f0[start:stop], alpha=float(base_dataset_size))
        numerator = torch.zeros(stop - start, dtype=torch.float32)
        precision = h0.clone()
        for t, f, w, size in zip(flat_tensors, flat_fishers, weights, sizes):
            h = f[start:stop].clamp_min(fisher_floor).mul_(size)  # H_t
            precision.add_(h, alpha=w)
            if fine_tuning_prior:
                h.add_(h0)  # H_0 + H_t
            numerator.addcmul_(h.mul_(w), t[start:stop].to(torch.float32) - b)
        # precision > 0 unless H_0 and every alpha_t H_t vanish there: then no model carries
        # information (the numerator is 0 too) and the entry stays at the base.
        safe = torch.where(precision > 0, precision, torch.ones_like(precision))
        out[start:stop] = b + numerator / safe
    return out.reshape(shape)


def _per_model(values: Sequence[float] | None, n: int, key: str) -> list[float]:
    if values is None:
        return [1.0] * n
    found = [float(v) for v in values]
    if len(found) != n:
        raise ConfigError(
            f"gradient_matching: {len(found)} values of {key} for {n} models; give one per model"
        )
    return found


def _base_fisher(
    statistics: Mapping[str, Sequence[torch.Tensor | None]] | None,
    name: str | None,
    shape: tuple[int, ...],
) -> torch.Tensor | None:
    """The base model's Fisher of this tensor as float32, or None when none is given."""
    entries = list((statistics or {}).get("base_fisher", []))
    if len(entries) > 1:
        raise ConfigError(
            f"gradient_matching: {len(entries)} base Fishers; give one (the base model's)"
        )
    if not entries or entries[0] is None:
        return None
    found = entries[0]
    if tuple(found.shape) != shape:
        raise ConfigError(
            f"gradient_matching: tensor {name}: the base model's Fisher has shape "
            f"{list(found.shape)}, expected {list(shape)}; was it computed for another model?"
        )
    found = found.to(torch.float32)
    _non_negative(found, name, "the base model's Fisher")
    return found


def _non_negative(fisher: torch.Tensor, name: str | None, what: str) -> None:
    if fisher.numel() and float(fisher.min()) < 0:
        raise ConfigError(
            f"gradient_matching: tensor {name}: {what} has negative entries (minimum "
            f"{float(fisher.min()):g}); a Fisher diagonal is a mean of squares, so check the "
            "statistics file"
        )
