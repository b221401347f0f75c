"""How big the demo is: the full study and the quick one (``--quick``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["FULL", "QUICK", "DemoSettings", "FederatedSettings", "settings_for"]


@dataclass(frozen=True)
class FederatedSettings:
    """Sizes of the federated scenario.

    Attributes
    ----------
    n_clients : int
        Clients (virtual SuperNodes of Flower's simulation engine).
    concentrations : tuple of float
        Dirichlet concentrations of the non-IID partitions compared.
    rounds : int
        Federated rounds per aggregator and partition.
    aggregators : tuple of str
        Keys of :data:`modelfuse.demo.federated.AGGREGATORS`.
    hidden : int
        Width of the MLP's two hidden layers.
    local_epochs, batch_size, learning_rate
        Each client's local SGD per round.
    participation : (float, float)
        Each client takes part in a round with its own probability, drawn once
        uniformly from this range.
    min_client_size : int
        The fewest examples a client may have (the partition is redrawn until
        every client has them).
    fisher_examples : int
        Examples of a client's diagonal Fisher (for ``Fisher``).
    """

    n_clients: int
    concentrations: tuple[float, ...]
    rounds: int
    aggregators: tuple[str, ...]
    hidden: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    participation: tuple[float, float]
    min_client_size: int
    fisher_examples: int


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run.

    Attributes
    ----------
    name : str
        ``"full"`` or ``"quick"``, shown in the report.
    n_soup : int
        Fine-tuned models of the soup scenario (K).
    tasks : tuple of str
        Tasks of the multi-task scenario (keys of :data:`modelfuse.demo.data.TASKS`).
    hidden : int
        Width of the MLP's two hidden layers.
    pretrain_epochs, finetune_epochs, task_epochs : int
        Training epochs of the pre-trained model, each soup fine-tune and each task model.
    n_resamples : int
        Bootstrap resamples (and permutations) of every interval and test.
    interval : {"bca", "percentile"}
        Bootstrap interval method.
    fisher_examples, gram_examples : int
        Training examples per model for the Fisher diagonals and Gram matrices.
    lambdas : tuple of float
        Scales of the averaged task vector tried for task arithmetic (by nested
        cross-validation), TIES and DARE (on the validation split).
    densities : tuple of float
        TIES and DARE densities tried on the validation split.
    outer_splits, inner_splits : int
        Folds of the nested cross-validation.
    wise_alphas : int
        Points of the WiSE-FT sweep from 0 to 1.
    caruana_rounds : int
        Rounds of Caruana's ensemble selection.
    adamerging_steps : int
        Adam steps of AdaMerging on the validation images.
    distill_epochs : int
        Most epochs of the distilled ensemble (early stopping on validation may stop sooner).
    federated : FederatedSettings
        The federated scenario.
    """

    name: str
    n_soup: int
    tasks: tuple[str, ...]
    hidden: int
    pretrain_epochs: int
    finetune_epochs: int
    task_epochs: int
    n_resamples: int
    interval: Literal["bca", "percentile"]
    fisher_examples: int
    gram_examples: int
    lambdas: tuple[float, ...]
    densities: tuple[float, ...]
    outer_splits: int
    inner_splits: int
    wise_alphas: int
    caruana_rounds: int
    adamerging_steps: int
    distill_epochs: int
    federated: FederatedSettings


_AGGREGATORS = ("FedAvg", "FedAvgM", "FedAU", "TIES", "Fisher")

FULL = DemoSettings(
    name="full",
    n_soup=8,
    tasks=("original", "rotated", "inverted", "noisy"),
    hidden=128,
    pretrain_epochs=20,
    finetune_epochs=20,
    task_epochs=20,
    n_resamples=2000,
    interval="bca",
    fisher_examples=1024,
    gram_examples=1000,
    lambdas=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0),
    densities=(0.2, 0.5, 0.8),
    outer_splits=5,
    inner_splits=3,
    wise_alphas=11,
    caruana_rounds=25,
    adamerging_steps=100,
    distill_epochs=30,
    federated=FederatedSettings(
        n_clients=10,
        concentrations=(0.3, 10.0),
        rounds=30,
        aggregators=_AGGREGATORS,
        hidden=64,
        local_epochs=2,
        batch_size=16,
        learning_rate=0.2,
        participation=(0.3, 1.0),
        min_client_size=40,
        fisher_examples=256,
    ),
)
"""The full study (``make demo``)."""

QUICK = DemoSettings(
    name="quick",
    n_soup=4,
    tasks=("original", "rotated", "inverted", "noisy"),
    hidden=64,
    pretrain_epochs=8,
    finetune_epochs=6,
    task_epochs=6,
    n_resamples=200,
    interval="bca",
    fisher_examples=256,
    gram_examples=256,
    lambdas=(0.5, 1.0, 2.0),
    densities=(0.5,),
    outer_splits=3,
    inner_splits=2,
    wise_alphas=6,
    caruana_rounds=10,
    adamerging_steps=40,
    distill_epochs=10,
    federated=replace(FULL.federated, rounds=6),
)
"""A smaller run for a first look and for the tests (``--quick``)."""


def settings_for(quick: bool) -> DemoSettings:
    """:data:`QUICK` when ``quick``, otherwise :data:`FULL`.

    Examples
    --------
    >>> settings_for(True).name
    'quick'
    """
    return QUICK if quick else FULL
