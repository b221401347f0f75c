r"""Task vectors: the one implementation behind task arithmetic, TIES, DARE and breadcrumbs.

Every method of the family is a setting of :func:`generalized_task_arithmetic`:

1. task vectors :math:`\tau_i = \theta_i - \theta_b`;
2. sparsify each :math:`\tau_i` (``sparsification``): keep the ``density``
   fraction of largest magnitudes (TIES), a Bernoulli sample of entries (DARE),
   or drop the top ``gamma`` and the bottom ``1 - density - gamma`` by magnitude
   (breadcrumbs); optionally rescale what is kept;
3. weight: :math:`x_i = w_i \hat\tau_i`;
4. combine: the sum :math:`\sum_i x_i`, or with ``consensus_method`` a sign
   election :math:`\gamma = \operatorname{sign}(\sum_i x_i)` (``"sum"``) or
   :math:`\operatorname{sign}(\sum_i \operatorname{sign} x_i)` (``"count"``), ties
   to +, and only the entries agreeing with :math:`\gamma` are summed;
5. ``normalize``: divide by the sum of the weights of the models that
   contributed (all of them without election; a zero sum counts as one);
6. :math:`\theta = \theta_b + \lambda \tau_m`.

The models are visited one at a time and only running sums are kept, so
memory does not grow with the number of models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.magnitude_selection import MagnitudeThreshold, top_k_mask
from modelfuse.merge.parameters import PER_MODEL, MethodParameters

__all__ = [
    "ConsensusMethod",
    "RescaleMethod",
    "SparsifyingParameters",
    "Sparsification",
    "TaskVectorParameters",
    "generalized_task_arithmetic",
    "sparsify",
]

Sparsification = Literal["magnitude", "random", "magnitude_outliers"]
ConsensusMethod = Literal["sum", "count"]
RescaleMethod = Literal["exact", "l1", "l2", "linf"]

_NORM_EPS = 1e-7


class TaskVectorParameters(MethodParameters):
    """Parameters shared by every task-vector method."""

    weight: Annotated[float, PER_MODEL] = Field(
        1.0,
        description="weight w_i of the model's task vector; negative removes a skill "
        "(mergekit requires it; modelfuse defaults to 1)",
    )
    lambda_: float = Field(
        1.0, alias="lambda", description="scale of the combined task vector, applied last"
    )
    normalize: bool = Field(
        False, description="divide the combined task vector by the sum of the weights"
    )
    int8_mask: bool = Field(
        False,
        description="accepted for mergekit configurations (a memory option there); "
        "no effect on the result",
    )


class SparsifyingParameters(TaskVectorParameters):
    """Parameters of the task-vector methods that sparsify each task vector."""

    density: Annotated[float, PER_MODEL] = Field(
        1.0, ge=0.0, le=1.0, description="fraction of each task vector's entries kept"
    )
    rescale: bool = Field(False, description="rescale the kept entries (see rescale_method)")
    rescale_method: RescaleMethod = Field(
        "exact",
        description="'exact': divide the kept entries by density (DARE's 1/(1-p)); "
        "'l1'/'l2'/'linf': restore the task vector's norm, as mergekit does",
    )


def _rescale(
    delta: torch.Tensor, kept: torch.Tensor, density: float, method: RescaleMethod
) -> torch.Tensor:
    if method == "exact":
        return kept.div_(density) if density > 0 else kept
    if method == "l1":
        before, after = delta.abs().sum(), kept.abs().sum()
    elif method == "l2":
        before, after = torch.linalg.vector_norm(delta), torch.linalg.vector_norm(kept)
    elif method == "linf":
        before, after = delta.abs().max(), kept.abs().max()
    else:
        raise ConfigError(
            f"rescale_method: unknown value {method!r}; valid: exact, l1, l2, linf"
        )
    if float(before) < _NORM_EPS or float(after) < _NORM_EPS:
        return kept
    return kept.mul_(before / after)


def sparsify(
    delta: torch.Tensor,
    *,
    method: Sparsification,
    density: float,
    gamma: float = 0.0,
    rescale: bool = False,
    rescale_method: RescaleMethod = "exact",
    generator: torch.Generator | None = None,
    threshold: MagnitudeThreshold | None = None,
    name: str = "",
) -> torch.Tensor:
    r"""Sparsify one task vector; returns a new tensor.

    Parameters
    ----------
    delta : Tensor
        The task vector. Not modified.
    method : {"magnitude", "random", "magnitude_outliers"}
        ``"magnitude"`` keeps the ``k = int(density * n)`` entries of largest
        magnitude (ties go to the lower index); ``"random"`` keeps each entry
        with probability ``density`` (DARE); ``"magnitude_outliers"`` drops the
        ``int(gamma * n)`` largest and keeps the next ``int(density * n)``
        (breadcrumbs; fewer large ones are dropped if both do not fit).
    density : float
        Fraction kept, in [0, 1]. ``density >= 1`` returns ``delta`` unchanged.
    gamma : float, default 0
        Fraction of largest magnitudes dropped (``"magnitude_outliers"``).
    rescale : bool, default False
        Rescale what is kept.
    rescale_method : {"exact", "l1", "l2", "linf"}, default "exact"
        ``"exact"`` divides by ``density`` (for DARE, exactly :math:`1/(1-p)`);
        the norms restore the task vector's norm before dropping (mergekit's
        ``rescale`` is ``"l1"``).
    generator : torch.Generator, optional
        Random numbers for ``"random"``.
    threshold : MagnitudeThreshold, optional
        A whole-model selection (TIES ``scope="global"``) used instead of the
        per-tensor one for ``"magnitude"``.
    name : str
        The tensor's name, for ``threshold``.

    Examples
    --------
    >>> sparsify(torch.tensor([0.1, -3.0, 2.0, 0.5]), method="magnitude", density=0.5)
    tensor([ 0., -3.,  2.,  0.])
    """
    if density >= 1 and threshold is None:
        return delta.clone()
    n = delta.numel()
    if method == "magnitude":
        magnitudes = delta.abs()
        if threshold is not None:
            mask = threshold.mask(magnitudes, name)
        else:
            mask = top_k_mask(magnitudes, int(density * n))
    elif method == "random":
        mask = torch.rand(delta.shape, generator=generator) < density
    elif method == "magnitude_outliers":
        target, top = int(density * n), int(gamma * n)
        bottom = n - target - top
        if bottom < 0:
            top += bottom
        magnitudes = delta.abs()
        mask = top_k_mask(magnitudes, top + target)
        if top > 0:
            mask &= ~top_k_mask(magnitudes, top)
    else:
        raise ConfigError(
            f"sparsification: unknown method {method!r}; valid: magnitude, random, "
            "magnitude_outliers"
        )
    kept = torch.where(mask, delta, torch.zeros((), dtype=delta.dtype))
    if rescale and density < 1:
        kept = _rescale(delta, kept, density, rescale_method)
    return kept


def _weights(weight: Sequence[float] | None, n: int, method: str) -> list[float]:
    weights = [1.0] * n if weight is None else [float(w) for w in weight]
    if len(weights) != n:
        raise ConfigError(
            f"{method}: {len(weights)} weights for {n} models; give one weight per model"
        )
    return weights


def _per_model(values: Sequence[float] | float | None, default: float, n: int, key: str,
               method: str) -> list[float]:
    if values is None:
        return [default] * n
    if isinstance(values, (int, float)):
        return [float(values)] * n
    out = [float(v) for v in values]
    if len(out) != n:
        raise ConfigError(f"{method}: {len(out)} values of {key} for {n} models; give one per model")
    return out


def generalized_task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Sequence[float] | None = None,
    density: Sequence[float] | float | None = None,
    gamma: Sequence[float] | float | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
    sparsification: Sparsification | None = None,
    consensus_method: ConsensusMethod | None = None,
    rescale: bool = False,
    rescale_method: RescaleMethod = "exact",
    generator: torch.Generator | None = None,
    magnitude_thresholds: Sequence[MagnitudeThreshold] | None = None,
    name: str = "",
    method: str = "task-vector merge",
) -> torch.Tensor:
    r"""Merge task vectors: sparsify, weight, elect signs, normalize, scale, add to the base.

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base model's tensor.
    weight : sequence of float, optional
        One weight per model (default 1).
    density, gamma : float or sequence of float, optional
        Per-model sparsification settings (see :func:`sparsify`).
    lambda_ : float, default 1.0
        Scale of the combined task vector, applied after ``normalize``.
    normalize : bool, default False
        Divide by the sum of the weights of the contributing models.
    sparsification : {"magnitude", "random", "magnitude_outliers"}, optional
        How each task vector is sparsified; None keeps it whole.
    consensus_method : {"sum", "count"}, optional
        Sign election (TIES); None sums every task vector.
    rescale, rescale_method
        See :func:`sparsify`.
    generator : torch.Generator, optional
        Random numbers for ``sparsification="random"``; the models draw from it
        in order.
    magnitude_thresholds : sequence of MagnitudeThreshold, optional
        Whole-model selections, one per model, for ``"magnitude"``.
    name : str
        The tensor's name (used with ``magnitude_thresholds``).
    method : str
        The method's name for error messages.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Ilharco et al., "Editing models with task arithmetic", ICLR 2023.
    Yadav et al., "TIES-Merging: resolving interference when merging models", NeurIPS 2023.
    Yu et al., "Language models are Super Mario: absorbing abilities from homologous
    models as a free lunch", ICML 2024.
    Davari and Belilovsky, "Model breadcrumbs: scaling multi-task model merging with
    sparse masks", ECCV 2024.

    Examples
    --------
    >>> base = torch.zeros(3)
    >>> a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-1.0, -1.0, 1.0])
    >>> generalized_task_arithmetic([a, b], base, consensus_method="sum", normalize=True)
    tensor([ 1.0000, -1.5000,  2.0000])
    """
    if base is None:
        raise ConfigError(f"{method} needs a base model; set base_model")
    n = len(tensors)
    if n == 0:
        raise ConfigError(f"{method}: no models besides the base; give at least one")
    weights = _weights(weight, n, method)
    densities = _per_model(density, 1.0, n, "density", method)
    gammas = _per_model(gamma, 0.0, n, "gamma", method)
    if magnitude_thresholds is not None and len(magnitude_thresholds) != n:
        raise ConfigError(
            f"{method}: {len(magnitude_thresholds)} magnitude thresholds for {n} models"
        )
    base32 = base.to(torch.float32)
    shape = base32.shape
    total = torch.zeros(shape, dtype=torch.float32)
    if consensus_method is not None:
        if consensus_method not in ("sum", "count"):
            raise ConfigError(
                f"consensus_method: unknown value {consensus_method!r}; valid: sum, count"
            )
        negative = torch.zeros(shape, dtype=torch.float32)  # total holds the positive part
        weight_pos = torch.zeros(shape, dtype=torch.float32) if normalize else None
        weight_neg = torch.zeros(shape, dtype=torch.float32) if normalize else None
        votes = torch.zeros(shape, dtype=torch.int32) if consensus_method == "count" else None
    for i, (tensor, w) in enumerate(zip(tensors, weights)):
        delta = tensor.to(torch.float32) - base32
        if sparsification is not None:
            delta = sparsify(
                delta,
                method=sparsification,
                density=densities[i],
                gamma=gammas[i],
                rescale=rescale,
                rescale_method=rescale_method,
                generator=generator,
                threshold=None if magnitude_thresholds is None else magnitude_thresholds[i],
                name=name,
            )
        if w != 1.0:
            delta.mul_(w)
        if consensus_method is None:
            total.add_(delta)
            continue
        positive = delta > 0
        below = delta < 0
        total.add_(delta.clamp(min=0))
        negative.add_(delta.clamp(max=0))
        if normalize:
            weight_pos.add_(positive, alpha=w)
            weight_neg.add_(below, alpha=w)
        if votes is not None:
            votes.add_(positive.to(torch.int32)).sub_(below.to(torch.int32))
    if consensus_method is None:
        if normalize:
            divisor = sum(weights)
            total.div_(divisor if abs(divisor) >= 1e-8 else 1.0)
    else:
        elected = (total + negative >= 0) if votes is None else (votes >= 0)
        total = torch.where(elected, total, negative)
        if normalize:
            divisor = torch.where(elected, weight_pos, weight_neg)
            divisor[divisor == 0] = 1.0
            total.div_(divisor)
    if lambda_ != 1.0:
        total.mul_(lambda_)
    return total.add_(base32)
