"""Fisher-weighted averaging: each entry averaged with weights from the models' Fisher diagonals."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import PER_MODEL, MethodParameters
from modelfuse.merge.statistics_tensors import collect_statistics

__all__ = ["FisherParameters", "fisher", "fisher_separable", "prepare_fisher"]

_BLOCK = 1 << 20  # entries merged at a time


class FisherParameters(MethodParameters):
    """Parameters of :func:`fisher`."""

    weight: Annotated[float, PER_MODEL] = Field(
        1.0, gt=0, description="the model's coefficient lambda_i (positive)"
    )
    fisher_floor: float = Field(
        1e-6, ge=0, description="lower bound applied to every Fisher entry (reference: 1e-6)"
    )
    normalize: Literal["none", "model", "tensor"] = Field(
        "none",
        description="divide each model's coefficient by the L2 norm of its Fisher over the "
        "whole model ('model', the reference's normalize_fishers) or over this tensor ('tensor')",
    )
    favor_first: bool = Field(
        False,
        description="floor only the first model's Fisher, so that entries where every "
        "Fisher vanishes take the first model's value",
    )


def fisher(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    statistics: Mapping[str, Sequence[torch.Tensor | None]] | None = None,
    weight: Sequence[float] | None = None,
    fisher_floor: float = 1e-6,
    normalize: Literal["none", "model", "tensor"] = "none",
    favor_first: bool = False,
    fisher_norms: Sequence[float] | None = None,
    name: str | None = None,
) -> torch.Tensor:
    r"""Fisher-weighted average: :math:`\sum_i \lambda_i \tilde F_i \theta_i / \sum_i \lambda_i \tilde F_i`.

    Entry by entry, with :math:`\tilde F_i = \max(F_i, \text{floor})` the
    model's diagonal Fisher (see :func:`modelfuse.statistics.fisher_diagonal`)
    bounded from below.

    Parameters
    ----------
    tensors : sequence of Tensor
        The models' tensors of one name. Not modified.
    base : Tensor, optional
        Unused; accepted so that every method has the same signature.
    statistics : dict, optional
        ``{"fisher": [F_1, ..., F_n]}``, one Fisher diagonal per model, each of
        the tensor's shape (the engine reads them from each model's
        ``statistics:`` file). When no model has a Fisher for this tensor (a
        buffer such as batch-norm running statistics) the result is the
        :math:`\lambda`-weighted average; when only some do, an error.
    weight : sequence of float, optional
        :math:`\lambda_i > 0`, one per model (default 1).
    fisher_floor : float, default 1e-6
        Lower bound of every Fisher entry (the reference's ``fisher_floor``).
    normalize : {"none", "model", "tensor"}, default "none"
        ``"model"`` divides :math:`\lambda_i` by :math:`\|F_i\|_2`, the norm
        of model i's Fisher over the whole model, as the reference's
        ``normalize_fishers`` does (the engine computes the norms in a
        preparation pass over the statistics files and passes them as
        ``fisher_norms``); ``"tensor"`` divides by the norm over this tensor
        only, which equalises the models' Fisher scale layer by layer. Norms
        are taken before the floor; a zero norm leaves :math:`\lambda_i` as it is.
    favor_first : bool, default False
        As the reference's ``favor_target_model``: the floor is applied to the
        first model's Fisher only, so that wherever every Fisher is zero the
        result is the first model's value (instead of the plain average).
    fisher_norms : sequence of float, optional
        Whole-model Fisher norms, one per model, for ``normalize="model"``
        (computed by :func:`prepare_fisher` when merging files).
    name : str, optional
        The tensor's name, for error messages.

    Returns
    -------
    Tensor
        float32. With ``fisher_floor=0`` an entry where every Fisher is zero is
        the first model's value when ``favor_first`` is set and the
        :math:`\lambda`-weighted average otherwise.

    Raises
    ------
    ConfigError
        Weights not one per model or not positive, Fisher tensors of another
        shape, missing for some models only, or with negative entries.

    References
    ----------
    Matena and Raffel, "Merging models with Fisher-weighted averaging",
    NeurIPS 2022; reference code github.com/mmatena/model_merging (floor 1e-6,
    ``normalize_fishers`` and ``favor_target_model`` options).

    Examples
    --------
    >>> a, b = torch.tensor([0.0, 0.0]), torch.tensor([4.0, 4.0])
    >>> fa, fb = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])
    >>> fisher([a, b], statistics={"fisher": [fa, fb]})
    tensor([3., 1.])
    """
    n = len(tensors)
    if n == 0:
        raise ConfigError("fisher: no tensors to merge; give at least one model")
    weights = [1.0] * n if weight is None else [float(w) for w in weight]
    if len(weights) != n:
        raise ConfigError(
            f"fisher: {len(weights)} weights for {n} models; give one weight per model"
        )
    if any(w <= 0 for w in weights):
        raise ConfigError(f"fisher: weights must be positive, got {weights}")
    shape = tuple(tensors[0].shape)
    fishers = collect_statistics(statistics, "fisher", n, method="fisher", name=name, shape=shape)
    if fishers is None:
        out = torch.zeros(shape, dtype=torch.float32)
        for tensor, w in zip(tensors, weights):
            out.add_(tensor.to(torch.float32), alpha=w)
        return out.div_(sum(weights))
    coefficients = []
    for i, (f, w) in enumerate(zip(fishers, weights)):
        if f.numel() and float(f.min()) < 0:
            raise ConfigError(
                f"fisher: tensor {name}: the Fisher of model {i} has negative entries "
                f"(minimum {float(f.min()):g}); a Fisher diagonal is a mean of squares, so "
                "check the statistics file"
            )
        coefficient = w
        if normalize == "tensor":
            norm = float(torch.linalg.vector_norm(f))
            if norm > 0:
                coefficient = w / norm
        elif normalize == "model":
            if fisher_norms is None or len(fisher_norms) != n:
                raise ConfigError(
                    "fisher: normalize='model' needs the whole-model Fisher norms, one per "
                    "model (fisher_norms); merge through modelfuse.merge or merge_state_dicts, "
                    "which compute them, or use normalize='tensor'"
                )
            if fisher_norms[i] > 0:
                coefficient = w / float(fisher_norms[i])
        coefficients.append(coefficient)
    flat_tensors = [t.reshape(-1) for t in tensors]
    flat_fishers = [f.reshape(-1) for f in fishers]
    out = torch.empty(flat_tensors[0].numel(), dtype=torch.float32)
    # Block by block, so that temporaries stay small whatever the tensor's size.
    for start in range(0, out.numel(), _BLOCK):
        stop = min(out.numel(), start + _BLOCK)
        numerator = torch.zeros(stop - start, dtype=torch.float32)
        denominator = torch.zeros(stop - start, dtype=torch.float32)
        for i, (t, f, c) in enumerate(zip(flat_tensors, flat_fishers, coefficients)):
            block = f[start:stop]
            if not favor_first or i == 0:
                block = block.clamp_min(fisher_floor)
            scaled = block.mul(c)
            denominator.add_(scaled)
            numerator.addcmul_(scaled, t[start:stop].to(torch.float32))
        vanished = denominator == 0
        if bool(vanished.any()):  # only possible with fisher_floor = 0
            if favor_first:
                fallback = flat_tensors[0][start:stop].to(torch.float32)
            else:
                fallback = sum(
                    w * t[start:stop].to(torch.float32) for w, t in zip(weights, flat_tensors)
                ) / sum(weights)
            safe = torch.where(vanished, torch.ones_like(denominator), denominator)
            out[start:stop] = torch.where(vanished, fallback, numerator / safe)
        else:
            out[start:stop] = numerator.div_(denominator)
    return out.reshape(shape)


def fisher_separable(parameters: Mapping[str, Any]) -> bool:
    """Row blocks give the same result unless the norm is taken over the tensor itself."""
    return parameters.get("normalize") != "tensor"


def prepare_fisher(stream: Callable[..., Iterator[tuple[Any, ...]]]) -> dict[str, Any]:
    """Whole-model Fisher norms ``||F_i||_2`` per model, for ``normalize="model"``.

    Streams the statistics of the tensors that use that setting, one tensor at
    a time, so memory stays bounded whatever the model size.

    Examples
    --------
    >>> def stream(select=None, what="tensors"):
    ...     yield "w", {"fisher": [torch.tensor([3.0]), torch.tensor([1.0])]}, {"normalize": "model"}
    ...     yield "b", {"fisher": [torch.tensor([4.0]), None]}, {"normalize": "model"}
    >>> prepare_fisher(stream)
    {'fisher_norms': [5.0, 1.0]}
    """
    squares: list[float] | None = None
    for _name, statistics, _parameters in stream(
        lambda name, parameters: parameters.get("normalize") == "model", what="statistics"
    ):
        fishers = statistics.get("fisher", [])
        if squares is None:
            squares = [0.0] * len(fishers)
        for i, f in enumerate(fishers):
            if f is not None:
                squares[i] += float(torch.linalg.vector_norm(f.to(torch.float64)) ** 2)
    if squares is None:
        return {}
    return {"fisher_norms": [value**0.5 for value in squares]}
