"""Model soups: the uniform average and the greedy soup of fine-tuned models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from modelfuse.executors import Executor
from modelfuse.merge.state_dict import merge_state_dicts
from modelfuse.search._evaluation import describe, evaluate_all
from modelfuse.search._state import check_matching, is_float
from modelfuse.search.results import Candidate, SearchResult
from modelfuse.search.scores import Score

__all__ = ["greedy_soup", "uniform_soup"]


def uniform_soup(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform soup: the plain average of every model's weights.

    Parameters
    ----------
    state_dicts : sequence of mappings name -> Tensor
        Models of one architecture, usually fine-tuned from one pre-trained
        model. Not modified.

    Returns
    -------
    dict name -> Tensor
        :math:`\\frac{1}{N}\\sum_i \\theta_i` for floating-point tensors;
        other tensors (counters, ids) are the first model's.

    References
    ----------
    Wortsman et al., "Model soups: averaging weights of multiple fine-tuned
    models improves accuracy without increasing inference time", ICML 2022.

    Examples
    --------
    >>> uniform_soup([{"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([2.0, 3.0])}])["w"]
    tensor([1., 2.])
    """
    check_matching(state_dicts)
    return merge_state_dicts("linear", state_dicts)


def _include(
    average: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], count: int
) -> dict[str, torch.Tensor]:
    """The running average of ``count`` models with one more model added."""
    out = {}
    for key, value in average.items():
        if is_float(value):
            out[key] = value * (count / (count + 1)) + new[key].to(value.dtype) / (count + 1)
        else:
            out[key] = value
    return out


def _in_dtypes(
    average: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The float32 running average cast back to the models' dtypes (no copy when float32)."""
    return {k: v.to(reference[k].dtype) for k, v in average.items()}


class _ScoreIngredient:
    """Score one model alone, given its index; picklable."""

    def __init__(self, state_dicts: Sequence[Mapping[str, torch.Tensor]], score: Score) -> None:
        self.state_dicts = state_dicts
        self.score = score

    def __repr__(self) -> str:
        return f"the score {describe(self.score)} of single models"

    def __call__(self, index: int) -> float:
        return float(self.score(self.state_dicts[index]))


def greedy_soup(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    score: Score,
    *,
    strict: bool = True,
    executor: Executor | None = None,
) -> SearchResult:
    """The greedy soup: add models to the average only while a held-out score improves.

    The models are scored alone and sorted best first (ties keep the input
    order). The soup starts as the best model; each next model is tried in
    the running average and kept only if the score of the average improves
    on the best so far: strictly (``>``, the paper's rule) when ``strict``,
    or when it is at least as good (``>=``) otherwise. The average is kept
    incrementally, :math:`\\bar\\theta_{k+1} = \\frac{k}{k+1}\\bar\\theta_k +
    \\frac{1}{k+1}\\theta`, in float32 for float tensors (others are the best
    model's).

    Because the soup only ever changes when its score improves, its score is
    never below that of the best single model on the data ``score`` uses.

    Parameters
    ----------
    state_dicts : sequence of mappings name -> Tensor
        Models of one architecture, fine-tuned from one pre-trained model.
        Not modified.
    score : callable
        ``score(state_dict) -> float`` on held-out data, higher is better
        (e.g. :func:`modelfuse.search.accuracy_score`).
    strict : bool, default True
        Require a strict improvement to add a model; ``False`` adds models
        that leave the score unchanged too.
    executor : Executor, optional
        Scores the models alone, all in one call and in parallel, e.g.
        ``modelfuse.executors.LocalExecutor(workers=2)`` or ``RayExecutor()``.
        The soup itself is built in this process, one model after another:
        whether a model is tried with or without the previous one depends on
        that one's score, so those ``N - 1`` scores cannot run side by side.
        With worker processes ``score`` must be picklable (see
        :mod:`modelfuse.executors`). None (default) scores everything in
        this process. The result is the same either way.

    Returns
    -------
    SearchResult
        ``parameters``: ``{"ingredients": tuple of input indices in the order
        they were added, "order": every index sorted by its own score}``;
        ``state_dict``: the soup; ``score``: its score; ``trace``: first one
        candidate per model alone (``{"model": i}``), then one per tried soup
        (``{"ingredients": (...), "accepted": bool}``).

    References
    ----------
    Wortsman et al., "Model soups: averaging weights of multiple fine-tuned
    models improves accuracy without increasing inference time", ICML 2022,
    Recipe 1 (GreedySoup).

    Examples
    --------
    >>> sds = [{"w": torch.tensor([v])} for v in (1.0, 3.0, 10.0)]
    >>> score = lambda sd: -abs(float(sd["w"]) - 2.0)
    >>> result = greedy_soup(sds, score)
    >>> result.parameters["ingredients"], float(result.state_dict["w"])
    ((0, 1), 2.0)
    """
    check_matching(state_dicts)
    alone = evaluate_all(executor, _ScoreIngredient(state_dicts, score), range(len(state_dicts)))
    trace = [Candidate({"model": i}, s) for i, s in enumerate(alone)]
    order = sorted(range(len(state_dicts)), key=lambda i: -alone[i])
    first = order[0]
    soup = {
        k: v.detach().to(torch.float32) if is_float(v) else v.detach().clone()
        for k, v in state_dicts[first].items()
    }
    ingredients = [first]
    best = alone[first]
    for i in order[1:]:
        candidate = _include(soup, state_dicts[i], len(ingredients))
        s = float(score(_in_dtypes(candidate, state_dicts[first])))
        accepted = s > best if strict else s >= best
        trace.append(Candidate({"ingredients": (*ingredients, i), "accepted": accepted}, s))
        if accepted:
            soup, best = candidate, s
            ingredients.append(i)
    return SearchResult(
        {"ingredients": tuple(ingredients), "order": tuple(order)},
        _in_dtypes(soup, state_dicts[first]),
        best,
        tuple(trace),
    )
