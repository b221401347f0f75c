"""How big the demo is: the full study and the quick one (``--quick``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["FULL", "QUICK", "DemoSettings", "settings_for"]


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
