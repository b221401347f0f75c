"""The settings of a federated aggregation, declared once and validated."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import MAX_LISTED, format_error, short

__all__ = ["AggregationMethod", "AggregationSettings", "OnFailure", "UncertaintySource", "settings"]

AggregationMethod = Literal[
    "linear",
    "fedavgm",
    "fedau",
    "ties",
    "dare_ties",
    "breadcrumbs",
    "fisher",
    "regmean",
    "uncertainty",
    "residual",
]
"""The aggregation methods, by name (see :data:`modelfuse.federated.AGGREGATORS`)."""

OnFailure = Literal["raise", "skip"]
UncertaintySource = Literal["variance", "fisher"]


class AggregationSettings(BaseModel):
    """Every setting of a federated aggregation, with its default and its bounds.

    Settings a method does not read are ignored by it, so one object describes
    any method; :func:`settings` builds it from keyword arguments or a Flower
    run configuration and turns a bad value into one :class:`ConfigError` line.

    Attributes
    ----------
    method : str
        The aggregation (see :data:`modelfuse.federated.AGGREGATORS`).
    on_failure : {"skip", "raise"}
        What a bad client reply does (shapes that differ from the global
        model's, NaN or inf values, missing statistics, no example count):
        ``"skip"`` leaves the client out of the round and logs why, naming it;
        ``"raise"`` stops the aggregation with one :class:`~modelfuse.errors.DataError`.
    server_learning_rate : float
        eta of FedAvgM and FedAU: the step taken along the aggregated update.
    server_momentum : float
        beta of FedAvgM.
    participation_cutoff : int
        K of FedAU: the longest participation interval counted.
    density : float
        Fraction of each client's update kept by ``ties``, ``dare_ties`` and ``breadcrumbs``.
    gamma : float
        Fraction of the largest magnitudes ``breadcrumbs`` drops.
    scale : float
        lambda, the scale of the merged update of ``ties``, ``dare_ties`` and ``breadcrumbs``.
    fisher_floor : float
        Lower bound of every Fisher entry (``fisher``).
    regmean_alpha : float
        Scale of the off-diagonal Gram entries (``regmean``).
    uncertainty_source : {"variance", "fisher"}
        What ``uncertainty`` weighs clients by: the inverse of the variance each
        client reports, or the mass of its Fisher diagonal.
    residual_threshold : float
        c of ``residual``: a client whose distance to the consensus exceeds c
        times the median distance is down-weighted.
    seed : int
        Seed of DARE's random drops (mixed with the round and the tensor's name).
    weighted_by_key : str
        The key of each reply's MetricRecord holding its number of examples.

    Examples
    --------
    >>> AggregationSettings(method="ties", density=0.3).density
    0.3
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: AggregationMethod = "linear"
    on_failure: OnFailure = "skip"
    server_learning_rate: float = Field(1.0, gt=0, allow_inf_nan=False)
    server_momentum: float = Field(0.9, ge=0, lt=1)
    participation_cutoff: int = Field(50, ge=1)
    density: float = Field(0.5, gt=0, le=1)
    gamma: float = Field(0.01, ge=0, lt=1)
    scale: float = Field(1.0, allow_inf_nan=False)
    fisher_floor: float = Field(1e-6, ge=0, allow_inf_nan=False)
    regmean_alpha: float = Field(0.1, ge=0, le=1)
    uncertainty_source: UncertaintySource = "variance"
    residual_threshold: float = Field(2.0, gt=0, allow_inf_nan=False)
    seed: int = Field(0, ge=0)
    weighted_by_key: str = "num-examples"


_PREFIX = "modelfuse-"


def settings(
    values: Mapping[str, Any] | None = None, *, where: str = "aggregation settings", **kwargs: Any
) -> AggregationSettings:
    """Validated :class:`AggregationSettings` from a mapping and/or keywords.

    Keys may be written as in Python (``server_momentum``) or as in a Flower run
    configuration (``server-momentum``), optionally prefixed ``modelfuse-``;
    keys of ``values`` that are no setting are an error, so a typo is caught.

    Parameters
    ----------
    values : mapping, optional
        Settings by name (e.g. a Flower ``context.run_config`` restricted to its
        ``modelfuse-`` keys).
    where : str
        Where the values come from, for messages.
    **kwargs
        More settings; they win over ``values``.

    Raises
    ------
    ConfigError
        One line naming each bad key, what was expected and what was received;
        an unknown method lists the valid ones.

    Examples
    --------
    >>> settings({"method": "fedavgm", "server-momentum": 0.5}).server_momentum
    0.5
    >>> settings({"modelfuse-method": "mean"}, where="run config")
    Traceback (most recent call last):
    ...
    modelfuse.errors.ConfigError: run config: modelfuse-method: unknown aggregation 'mean'; valid: linear, fedavgm, fedau, ties, dare_ties, breadcrumbs, fisher, regmean, uncertainty, residual
    """
    merged: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # field -> the key as the caller wrote it, for messages
    for key, value in {**(values or {}), **kwargs}.items():
        name = str(key)
        if name.startswith(_PREFIX):
            name = name[len(_PREFIX) :]
        field = name.replace("-", "_")
        merged[field] = value
        spelled[field] = str(key)
    method = merged.get("method", "linear")
    valid = get_args(AggregationMethod)
    if method not in valid:
        raise ConfigError(
            f"{where}: {spelled.get('method', 'method')}: unknown aggregation {short(method)}; "
            f"valid: {', '.join(valid)}"
        )
    try:
        return AggregationSettings(**merged)
    except ValidationError as error:
        problems = []
        for problem in error.errors()[:MAX_LISTED]:
            loc = problem["loc"]
            if loc and loc[0] in spelled:
                problem = {**problem, "loc": (spelled[str(loc[0])], *loc[1:])}
            problems.append(format_error(problem))
        raise ConfigError(f"{where}: " + "; ".join(problems)) from None
