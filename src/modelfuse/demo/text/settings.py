"""The sizes of the text study: a full run and a quick one."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TEXT_FULL", "TEXT_QUICK", "TextSettings", "text_settings_for"]


@dataclass(frozen=True)
class TextSettings:
    """Everything that makes the text study larger or smaller.

    Attributes
    ----------
    name : str
        ``"full"`` or ``"quick"``.
    max_examples : int
        Examples kept per task (class-balanced where a task's classes allow),
        split 60 / 20 / 20 into train, validation and test.
    steps, batch_size, learning_rate : int, int, float
        Fine-tuning: AdamW steps of ``batch_size`` texts, linearly decayed
        learning rate. The word-embedding table stays frozen (as the base's).
    max_length : int
        Tokens kept per text.
    lambdas : tuple of float
        The scaling grid of task arithmetic, TIES and DARE (chosen on validation).
    ties_density, dare_density : float
        Fraction of each task vector kept by TIES (by magnitude) and DARE (at random).
    fisher_examples, gram_examples : int
        Training texts per task behind each Fisher diagonal and Gram matrix.
    adamerging_steps : int
        Adam steps of layer-wise AdaMerging on unlabeled validation texts.
    n_resamples : int
        Bootstrap resamples of the intervals and paired tests.
    """

    name: str
    max_examples: int
    steps: int
    batch_size: int
    learning_rate: float
    max_length: int
    lambdas: tuple[float, ...]
    ties_density: float
    dare_density: float
    fisher_examples: int
    gram_examples: int
    adamerging_steps: int
    n_resamples: int


TEXT_FULL = TextSettings(
    name="full",
    max_examples=1200,
    steps=200,
    batch_size=16,
    learning_rate=1e-4,
    max_length=16,
    lambdas=(0.3, 0.5, 0.7, 1.0),
    ties_density=0.2,
    dare_density=0.5,
    fisher_examples=48,
    gram_examples=400,
    adamerging_steps=60,
    n_resamples=2000,
)

TEXT_QUICK = TextSettings(
    name="quick",
    max_examples=500,
    steps=50,
    batch_size=16,
    learning_rate=1e-4,
    max_length=16,
    lambdas=(0.5, 1.0),
    ties_density=0.2,
    dare_density=0.5,
    fisher_examples=12,
    gram_examples=100,
    adamerging_steps=15,
    n_resamples=500,
)


def text_settings_for(quick: bool) -> TextSettings:
    """The quick or the full settings.

    Examples
    --------
    >>> text_settings_for(True).name
    'quick'
    """
    return TEXT_QUICK if quick else TEXT_FULL
