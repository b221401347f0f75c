"""Choosing a hyperparameter on the validation split, with nested cross-validation.

Merging itself fits nothing, so a candidate setting (say task arithmetic's
lambda) is fully described by its validation predictions; the nested
cross-validation of :func:`modelfuse.evaluation.nested_cross_validation`
then estimates how well *choosing* among the settings does on validation
samples the choice never saw, and the final setting is chosen by the same
inner procedure run on the whole validation split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelfuse.evaluation import NestedCVResult

__all__ = ["NestedChoice", "choose_by_nested_cv"]


@dataclass(frozen=True)
class NestedChoice:
    """The chosen setting, its cross-validated score on the whole validation split, and the
    nested-CV estimate of the choosing procedure."""

    chosen: dict[str, Any]
    index: int
    cv_scores: tuple[float, ...]
    nested: NestedCVResult


def _folds(y: np.ndarray, n_splits: int, seed: int) -> list[np.ndarray]:
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [test for _, test in splitter.split(np.zeros(len(y)), y)]


def choose_by_nested_cv(
    candidates: Sequence[Mapping[str, Any]],
    correct: np.ndarray,
    y: np.ndarray,
    *,
    outer_splits: int,
    inner_splits: int,
    seed: int,
) -> NestedChoice:
    """Choose among settings by validation accuracy, with a nested-CV estimate of the choice.

    Parameters
    ----------
    candidates : sequence of dict
        The settings.
    correct : array of shape (n_candidates, n_samples)
        1 where candidate ``c`` classifies validation sample ``i`` correctly.
    y : array of shape (n_samples,)
        Validation labels (for stratified folds).
    outer_splits, inner_splits : int
    seed : int

    Returns
    -------
    NestedChoice
        ``chosen`` maximises the mean accuracy over ``inner_splits`` stratified
        folds of the whole validation split (the first on ties);
        ``nested`` is the nested cross-validation of that procedure.

    Examples
    --------
    >>> y = np.array([0, 1] * 30)
    >>> correct = np.stack([np.ones(60), np.zeros(60)])
    >>> choose_by_nested_cv([{"lambda": 1}, {"lambda": 2}], correct, y,
    ...                     outer_splits=3, inner_splits=2, seed=0).chosen
    {'lambda': 1}
    """
    from modelfuse.evaluation import nested_cross_validation

    settings = [dict(c) for c in candidates]
    hits = np.asarray(correct, dtype=np.float64)

    def fit_score(params: Mapping[str, Any], train: np.ndarray, test: np.ndarray) -> float:
        # nothing to fit: a merge with fixed settings is the same model on every fold
        return float(hits[settings.index(dict(params)), test].mean())

    nested = nested_cross_validation(
        fit_score,
        settings,
        y,
        outer_splits=outer_splits,
        inner_splits=inner_splits,
        random_state=seed,
    )
    folds = _folds(np.asarray(y), inner_splits, seed)
    scores = tuple(float(np.mean([hits[c, f].mean() for f in folds])) for c in range(len(settings)))
    best = int(np.argmax(scores))
    return NestedChoice(settings[best], best, scores, nested)
