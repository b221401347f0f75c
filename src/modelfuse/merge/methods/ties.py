"""TIES merging: trim, elect sign, disjoint merge; per tensor or over the whole model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.methods.global_top_k import global_top_k
from modelfuse.merge.methods.magnitude_threshold import MagnitudeThreshold, TensorSelection
from modelfuse.merge.methods.rescaling import RescaledSelections, trim_reduction
from modelfuse.merge.methods.sign_consensus import ConsensusMethod
from modelfuse.merge.methods.sparsification import RescaleMethod
from modelfuse.merge.methods.task_vectors import SparsifyingParameters, generalized_task_arithmetic

__all__ = ["TiesParameters", "per_tensor_trimming", "prepare_ties", "ties", "ties_selections"]

Scope = Literal["tensor", "global"]


class TiesParameters(SparsifyingParameters):
    """Parameters of :func:`ties` (mergekit's ``ties``)."""

    normalize: bool = Field(
        True,
        description="divide by the sum of the weights of the models agreeing with the "
        "elected sign (the disjoint mean)",
    )
    consensus_method: ConsensusMethod = Field(
        "sum", description="sign election: 'sum' of weighted task vectors, or 'count' of signs"
    )
    scope: Scope = Field(
        "tensor",
        description="trim each tensor to density ('tensor', as mergekit) or each model as a "
        "whole ('global', as the paper's code)",
    )


def ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: Sequence[float] | None = None,
    density: Sequence[float] | float | None = None,
    lambda_: float = 1.0,
    normalize: bool = True,
    consensus_method: ConsensusMethod = "sum",
    scope: Scope = "tensor",
    rescale: bool = False,
    rescale_method: RescaleMethod = "l1",
    int8_mask: bool = False,
    name: str = "",
    magnitude_thresholds: Sequence[MagnitudeThreshold] | None = None,
    selections: Sequence[Sequence[TensorSelection]] | RescaledSelections | None = None,
    offset: int = 0,
) -> torch.Tensor:
    r"""TIES merging of task vectors.

    1. trim: keep the ``max(1, int(density * n))`` largest-magnitude entries of
       each task vector :math:`\tau_i = \theta_i - \theta_b` (none at density
       0), mergekit 0.1.5's count;
    2. elect: :math:`\gamma = \operatorname{sign}(\sum_i w_i \hat\tau_i)` (``"sum"``)
       or the majority of signs (``"count"``), zero counting as +;
    3. disjoint merge: :math:`\tau_m = \sum_{i: \operatorname{sign}(w_i\hat\tau_i) = \gamma}
       w_i \hat\tau_i`, divided by the sum of those :math:`w_i` when ``normalize``;
    4. :math:`\theta = \theta_b + \lambda \tau_m`.

    Parameters
    ----------
    tensors : sequence of Tensor
        The fine-tuned models' tensors of one name. Not modified.
    base : Tensor
        The base model's tensor.
    weight : sequence of float, optional
        One weight per model (default 1).
    density : float or sequence of float, optional
        Fraction of each task vector kept (default 1: nothing trimmed).
    lambda_ : float, default 1.0
        Scale of the merged task vector (``lambda`` in configurations).
    normalize : bool, default True
        The disjoint mean (divide by the agreeing models' weight sum).
    consensus_method : {"sum", "count"}, default "sum"
        How the sign is elected.
    scope : {"tensor", "global"}, default "tensor"
        Trim per tensor, or per model over every ``scope: global`` tensor; the
        latter needs ``magnitude_thresholds`` from :func:`prepare_ties`, which
        :func:`~modelfuse.merge.merge` and
        :func:`~modelfuse.merge.merge_state_dicts` compute for you.
    rescale, rescale_method
        Rescale the trimmed task vectors (see
        :func:`~modelfuse.merge.methods.task_vectors.sparsify`); off by default, and
        to the L1 norm when on, as in mergekit.
    int8_mask : bool, default False
        Accepted for mergekit configurations; no effect.
    name : str
        The tensor's name.
    magnitude_thresholds : sequence of MagnitudeThreshold, optional
        The whole-model selections, one per model, for ``scope="global"``.
    selections : list of list of TensorSelection or RescaledSelections, optional
        :func:`ties_selections` of the whole tensor (``scope="tensor"``), when
        the inputs are a block of rows of it; found from the inputs when not given.
    offset : int, default 0
        The flat index of the inputs' first entry in the whole tensor.

    Returns
    -------
    Tensor
        float32.

    References
    ----------
    Yadav, Tam, Choshen, Raffel and Bansal, "TIES-Merging: resolving interference
    when merging models", NeurIPS 2023. https://arxiv.org/abs/2306.01708

    Examples
    --------
    >>> base = torch.zeros(4)
    >>> a = torch.tensor([3.0, -1.0, 0.5, 2.0])
    >>> b = torch.tensor([-1.0, -2.0, 1.0, 0.1])
    >>> ties([a, b], base, density=0.5)
    tensor([ 3., -2.,  0.,  2.])
    """
    del int8_mask
    if scope == "global":
        if magnitude_thresholds is None:
            raise ConfigError(
                f"ties: tensor {name or '(unnamed)'} has scope 'global', which trims over the "
                "whole model; merge with modelfuse.merge / merge_state_dicts (they run the "
                "prepare pass), or pass magnitude_thresholds from prepare_ties"
            )
    elif scope != "tensor":
        raise ConfigError(f"scope: unknown value {scope!r}; valid: tensor, global")
    return generalized_task_arithmetic(
        tensors,
        base,
        weight=weight,
        density=density,
        lambda_=lambda_,
        normalize=normalize,
        sparsification="magnitude",
        consensus_method=consensus_method,
        rescale=rescale,
        rescale_method=rescale_method,
        magnitude_thresholds=magnitude_thresholds if scope == "global" else None,
        selections=selections if scope == "tensor" else None,
        offset=offset,
        name=name,
        method="ties",
    )


def ties_selections(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    density: Sequence[float] | float | None = None,
    rescale: bool = False,
    rescale_method: RescaleMethod = "l1",
) -> list[list[TensorSelection]] | RescaledSelections:
    """The per-tensor reduction of :func:`ties` (``scope: tensor``): each model's
    magnitude threshold of the whole tensor, and with a norm rescale its factor (see
    :func:`~modelfuse.merge.methods.rescaling.trim_reduction`).

    Examples
    --------
    >>> ties_selections([torch.tensor([1.0, -4.0, 3.0])], torch.zeros(3), density=0.34)
    [[TensorSelection(value=4.0, cutoff=None)]]
    """
    return trim_reduction(
        tensors,
        base,
        density=density,
        rescale=rescale,
        rescale_method=rescale_method,
        method="ties",
    )


def per_tensor_trimming(parameters: Mapping[str, Any]) -> bool:
    """Whether ``ties`` trims this tensor on its own (``scope: tensor``), so that large
    tensors are reduced to their thresholds (and norm-rescale factors) first and merged
    in blocks of rows; not with ``scope: global``, whose thresholds are the whole model's."""
    return parameters.get("scope", "tensor") == "tensor"


def _is_global(_name: str, parameters: Mapping[str, Any]) -> bool:
    return parameters.get("scope") == "global"


def prepare_ties(stream: Any) -> dict[str, Any]:
    """The prepare pass of ``ties``: one magnitude threshold per model over the whole model.

    Reads only the tensors whose ``scope`` is ``"global"`` (nothing at all when
    there are none), two or three times, one tensor at a time.

    Parameters
    ----------
    stream : callable
        ``stream(select)`` yields ``(name, tensors, base, parameters)`` (see
        :func:`modelfuse.merge.execute.prepare_stream`).

    Returns
    -------
    dict
        ``{"magnitude_thresholds": [MagnitudeThreshold, ...]}``, or ``{}``.

    Raises
    ------
    ConfigError
        A model's ``density`` differs between ``scope: global`` tensors.

    Examples
    --------
    >>> base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    >>> model = {"a": torch.tensor([0.5, 4.0]), "b": torch.tensor([1.0, -3.0, 2.0])}
    >>> params = {"scope": "global", "density": [0.4]}
    >>> def stream(select=None):
    ...     for name in base:
    ...         if select is None or select(name, params):
    ...             yield name, [model[name]], base[name], params
    >>> prepare_ties(stream)["magnitude_thresholds"][0].value  # 2 of 5 kept: 4 and -3
    3.0
    """
    densities: list[float] | None = None
    first = ""
    for name, _tensors, _base, parameters in _headers(stream):
        values = [float(d) for d in parameters["density"]]
        if densities is None:
            densities, first = values, name
        elif values != densities:
            raise ConfigError(
                f"ties: with scope 'global' every model keeps one density over the whole "
                f"model, but tensor {name} has density {values} and tensor {first} has "
                f"{densities}; give density without layer gradients or filters"
            )
    if densities is None:
        return {}

    def magnitudes() -> Iterator[tuple[str, list[torch.Tensor]]]:
        for name, tensors, base, _parameters in stream(_is_global):
            base32 = base.to(torch.float32)
            yield name, [(t.to(torch.float32) - base32).abs_() for t in tensors]

    return {"magnitude_thresholds": global_top_k(magnitudes, densities)}


class _Headers:
    """Parameters of the selected tensors without reading them (see :func:`prepare_ties`)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Mapping[str, Any]]] = []

    def __call__(self, name: str, parameters: Mapping[str, Any]) -> bool:
        if _is_global(name, parameters):
            self.seen.append((name, parameters))
        return False


def _headers(stream: Any) -> Iterator[tuple[str, None, None, Mapping[str, Any]]]:
    collect = _Headers()
    for _ in stream(collect):
        pass
    for name, parameters in collect.seen:
        yield name, None, None, parameters
