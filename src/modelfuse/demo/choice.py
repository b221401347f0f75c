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
from typing import TYPE_CHECKING, Any

import numpy as np

from modelfuse.demo.settings import DemoSettings
from modelfuse.evaluation import NestedCVResult

if TYPE_CHECKING:
    import torch
    from torch import nn

    from modelfuse.search import Score, SearchResult

__all__ = [
    "NestedChoice",
    "choose_by_nested_cv",
    "choose_task_arithmetic",
    "describe_grid",
    "describe_nested",
    "search_ties_and_dare",
]


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


def describe_nested(choice: NestedChoice) -> str:
    """The nested-CV estimate of a choice as the merge details state it (3 decimals).

    Examples
    --------
    >>> y = np.array([0, 1] * 30)
    >>> c = choose_by_nested_cv([{"lambda": 1}], np.ones((1, 60)), y,
    ...                         outer_splits=3, inner_splits=2, seed=0)
    >>> describe_nested(c)
    'nested-CV estimate 1.000 [1.000, 1.000]'
    """
    nested = choice.nested
    return f"nested-CV estimate {nested.statistic:.3f} [{nested.ci[0]:.3f}, {nested.ci[1]:.3f}]"


def choose_task_arithmetic(
    model: nn.Module,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor],
    x_val: np.ndarray,
    y_val: np.ndarray,
    settings: DemoSettings,
    seed: int,
) -> tuple[NestedChoice, dict[str, torch.Tensor]]:
    """Task arithmetic (normalised mean task vector) with lambda chosen by nested CV on validation.

    Every lambda of ``settings.lambdas`` is merged and run on ``x_val``;
    :func:`choose_by_nested_cv` picks among them with
    ``settings.outer_splits`` and ``settings.inner_splits`` folds.

    Returns
    -------
    choice : NestedChoice
    state_dict : dict
        The merge with the chosen lambda.

    Examples
    --------
    >>> import dataclasses, torch
    >>> from modelfuse.demo.settings import QUICK
    >>> from modelfuse.demo.zoo import make_mlp
    >>> _ = torch.manual_seed(0)
    >>> base, tuned = make_mlp(4).state_dict(), make_mlp(4).state_dict()
    >>> x = np.random.default_rng(0).random((40, 64)).astype(np.float32)
    >>> settings = dataclasses.replace(QUICK, lambdas=(0.0,))
    >>> choice, sd = choose_task_arithmetic(make_mlp(4), [tuned], base, x, np.arange(40) % 2,
    ...                                     settings, seed=0)
    >>> choice.chosen, torch.equal(sd["0.weight"], base["0.weight"])
    ({'lambda': 0.0}, True)
    """
    import modelfuse
    from modelfuse.demo.evaluate import log_probabilities
    from modelfuse.demo.zoo import predict_logits

    lambdas = tuple(settings.lambdas)
    merges = [
        modelfuse.merge_state_dicts(
            "task_arithmetic", state_dicts, base, lambda_=lam, normalize=True
        )
        for lam in lambdas
    ]
    correct = np.stack(
        [log_probabilities(predict_logits(model, sd, x_val)).argmax(1) == y_val for sd in merges]
    )
    choice = choose_by_nested_cv(
        [{"lambda": lam} for lam in lambdas],
        correct,
        y_val,
        outer_splits=settings.outer_splits,
        inner_splits=settings.inner_splits,
        seed=seed,
    )
    return choice, merges[choice.index]


def search_ties_and_dare(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor],
    settings: DemoSettings,
    score: Score,
    seed: int,
) -> tuple[SearchResult, SearchResult]:
    """TIES and DARE-TIES (normalised, drop seed ``seed``), each by a grid on validation.

    The grid is ``settings.densities`` x ``settings.lambdas``; ``score`` is
    the validation score of a merged state dict.

    Examples
    --------
    >>> import torch
    >>> from modelfuse.demo.settings import QUICK
    >>> from modelfuse.demo.zoo import make_mlp
    >>> _ = torch.manual_seed(0)
    >>> base, tuned = make_mlp(4).state_dict(), [make_mlp(4).state_dict() for _ in range(2)]
    >>> ties, dare = search_ties_and_dare(tuned, base, QUICK,
    ...                                   lambda sd: -float(sd["4.bias"].abs().sum()), seed=0)
    >>> describe_grid(ties).startswith("density 0.5, lambda ")
    True
    """
    from modelfuse.search import grid_search

    space = {"density": list(settings.densities), "lambda": list(settings.lambdas)}
    ties = grid_search("ties", state_dicts, base, space, score)
    dare = grid_search(
        "dare_ties",
        state_dicts,
        base,
        space,
        score,
        parameters={"normalize": True, "random_seed": seed},
    )
    return ties, dare


def describe_grid(result: SearchResult) -> str:
    """The density and lambda a grid search chose, as the merge details state them.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> describe_grid(SimpleNamespace(parameters={"density": 0.5, "lambda": 1.0}))
    'density 0.5, lambda 1 (grid on validation)'
    """
    p = result.parameters
    return f"density {p['density']:g}, lambda {p['lambda']:g} (grid on validation)"
