"""Federated aggregation on Flower with modelfuse's merge methods.

- :class:`MergeStrategy`: a Flower strategy (``flwr.serverapp``) whose
  aggregation is any of :data:`AGGREGATORS` (FedAvg, FedAvgM, FedAU, TIES,
  DARE-TIES, breadcrumbs, Fisher, RegMean, uncertainty- and residual-weighted
  averaging), tensor by tensor;
- :func:`prepare_round` / :func:`aggregate`: the same aggregation without
  Flower, on :class:`ClientUpdate` objects;
- client side: :func:`requested_statistics`, :func:`client_statistics`,
  :func:`trajectory_variance`, :func:`client_reply`;
- :class:`Personalizer`: per client, the local, global, interpolated and
  FedLabel-selected models compared on the client's own held-out split.

:class:`MergeStrategy` and :func:`client_update` need Flower
(``pip install 'modelfuse[federated]'``); they are imported on first use, so
the rest of the package works without it.
"""

from __future__ import annotations

from typing import Any

from modelfuse.federated.aggregate import RoundAggregation, aggregate, prepare_round
from modelfuse.federated.aggregators import AGGREGATORS, Aggregator
from modelfuse.federated.client import (
    STATISTICS_KEY,
    VARIANCE_KEY,
    client_reply,
    client_statistics,
    requested_statistics,
    trajectory_variance,
)
from modelfuse.federated.personalize import (
    CANDIDATES,
    ClientComparison,
    ClientSplit,
    PersonalizationResult,
    Personalizer,
    fedlabel_select,
)
from modelfuse.federated.settings import (
    AggregationMethod,
    AggregationSettings,
    OnFailure,
    UncertaintySource,
    settings,
)
from modelfuse.federated.updates import ClientUpdate, Participation, ServerState, SkippedClient

__all__ = [
    "AGGREGATORS",
    "AggregationMethod",
    "AggregationSettings",
    "Aggregator",
    "CANDIDATES",
    "ClientComparison",
    "ClientSplit",
    "ClientUpdate",
    "MergeStrategy",
    "OnFailure",
    "Participation",
    "PersonalizationResult",
    "Personalizer",
    "RoundAggregation",
    "STATISTICS_KEY",
    "ServerState",
    "SkippedClient",
    "UncertaintySource",
    "VARIANCE_KEY",
    "aggregate",
    "client_reply",
    "client_statistics",
    "client_update",
    "fedlabel_select",
    "prepare_round",
    "requested_statistics",
    "settings",
    "trajectory_variance",
]

_NEEDS_FLOWER = ("MergeStrategy", "client_update")


def __getattr__(name: str) -> Any:
    if name in _NEEDS_FLOWER:
        try:
            from modelfuse.federated import strategy
        except ModuleNotFoundError as error:
            if error.name is None or not error.name.startswith("flwr"):
                raise
            raise ImportError(
                f"modelfuse.federated.{name} needs Flower, which is not installed; "
                "pip install 'modelfuse[federated]'"
            ) from None
        return getattr(strategy, name)
    raise AttributeError(f"module 'modelfuse.federated' has no attribute {name!r}")
