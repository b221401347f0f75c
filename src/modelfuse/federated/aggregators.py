"""The registry of federated aggregations: names, what clients send, papers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from modelfuse.federated.settings import AggregationSettings

__all__ = ["AGGREGATORS", "Aggregator"]


@dataclass(frozen=True)
class Aggregator:
    """A registered aggregation.

    Attributes
    ----------
    name : str
        Its name in settings.
    summary : str
        One line for tables and messages.
    statistics : callable
        ``statistics(settings) -> tuple of str``: what each client must send
        (``"fisher"``, ``"gram"``, ``"variance"``).
    reference : str
        The paper.
    """

    name: str
    summary: str
    statistics: Callable[[AggregationSettings], tuple[str, ...]]
    reference: str


def _none(_settings: AggregationSettings) -> tuple[str, ...]:
    return ()


def _uncertainty_statistics(settings: AggregationSettings) -> tuple[str, ...]:
    return ("variance",) if settings.uncertainty_source == "variance" else ("fisher",)


AGGREGATORS: dict[str, Aggregator] = {
    "linear": Aggregator(
        "linear",
        "FedAvg: the clients' models averaged with weights n_i (their example counts)",
        _none,
        "McMahan et al., Communication-efficient learning of deep networks from "
        "decentralized data, AISTATS 2017",
    ),
    "fedavgm": Aggregator(
        "fedavgm",
        "FedAvgM: server momentum on the pseudo-gradient theta_g - FedAvg",
        _none,
        "Hsu, Qi and Brown, Measuring the effects of non-identical data distribution for "
        "federated visual classification, arXiv:1909.06335, 2019",
    ),
    "fedau": Aggregator(
        "fedau",
        "FedAU: updates weighted by each client's estimated participation interval",
        _none,
        "Wang and Ji, A lightweight method for tackling unknown participation statistics in "
        "federated averaging, ICLR 2024",
    ),
    "ties": Aggregator(
        "ties",
        "TIES over the clients' updates: trim, elect signs, disjoint mean",
        _none,
        "Yadav et al., TIES-Merging: resolving interference when merging models, NeurIPS 2023",
    ),
    "dare_ties": Aggregator(
        "dare_ties",
        "DARE over the clients' updates: random drop and rescale, then TIES' election",
        _none,
        "Yu et al., Language models are super Mario: absorbing abilities from homologous "
        "models as a free lunch, ICML 2024",
    ),
    "breadcrumbs": Aggregator(
        "breadcrumbs",
        "model breadcrumbs over the clients' updates: drop the largest and smallest entries",
        _none,
        "Davari and Belilovsky, Model breadcrumbs: scaling multi-task model merging with "
        "sparse masks, ECCV 2024",
    ),
    "fisher": Aggregator(
        "fisher",
        "Fisher-weighted average, lambda_i = n_i (clients send diagonal Fisher)",
        lambda _s: ("fisher",),
        "Matena and Raffel, Merging models with Fisher-weighted averaging, NeurIPS 2022",
    ),
    "regmean": Aggregator(
        "regmean",
        "RegMean on linear layers with Gram matrices weighted by n_i (clients send Grams)",
        lambda _s: ("gram",),
        "Jin et al., Dataless knowledge fusion by merging weights of language models, ICLR 2023",
    ),
    "uncertainty": Aggregator(
        "uncertainty",
        "weights n_i / variance_i (reported) or n_i * mean Fisher_i (precision-weighted)",
        _uncertainty_statistics,
        "Reyes et al., Precision-weighted federated learning, arXiv:2107.09627, 2021",
    ),
    "residual": Aggregator(
        "residual",
        "weights n_i, cut (Huber) for clients far from the coordinate-wise median",
        _none,
        "Fu et al., Attack-resistant federated learning with residual-based reweighting, "
        "arXiv:1912.11464, 2019",
    ),
}
"""Every aggregation, by the name used in :class:`AggregationSettings`."""
