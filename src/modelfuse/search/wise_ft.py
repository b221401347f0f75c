"""WiSE-FT: the score curve of interpolations between a zero-shot and a fine-tuned model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.state_dict import merge_state_dicts
from modelfuse.search._state import check_matching
from modelfuse.search.results import Candidate, SearchResult
from modelfuse.search.scores import Score

__all__ = ["wise_ft_sweep"]


def wise_ft_sweep(
    zero_shot: Mapping[str, torch.Tensor],
    fine_tuned: Mapping[str, torch.Tensor],
    score: Score,
    *,
    alphas: Sequence[float] | int = 11,
) -> SearchResult:
    """Score :math:`(1 - \\alpha)\\theta_{zs} + \\alpha\\theta_{ft}` over a sweep of alpha.

    Parameters
    ----------
    zero_shot : mapping name -> Tensor
        The zero-shot (pre-trained) model. Not modified.
    fine_tuned : mapping name -> Tensor
        The same model fine-tuned. Not modified.
    score : callable
        ``score(state_dict) -> float``, higher is better.
    alphas : sequence of float or int, default 11
        The mixing coefficients to evaluate, each in [0, 1]; an integer ``n``
        means ``n`` evenly spaced values from 0 to 1 inclusive.

    Returns
    -------
    SearchResult
        ``parameters``: ``{"alpha": best alpha}`` (the smallest on ties);
        ``state_dict``: :math:`\\theta(\\alpha)`; ``trace``: one candidate
        ``{"alpha": a}`` per value, in the given order: the score curve.

    References
    ----------
    Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022.

    Examples
    --------
    >>> zs, ft = {"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}
    >>> r = wise_ft_sweep(zs, ft, lambda sd: -abs(float(sd["w"]) - 0.6), alphas=6)
    >>> r.parameters["alpha"], [c.parameters["alpha"] for c in r.trace]
    (0.6, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    """
    check_matching([zero_shot, fine_tuned], where="[zero_shot, fine_tuned]")
    if isinstance(alphas, int) and not isinstance(alphas, bool):
        if alphas < 2:
            raise ConfigError(f"alphas: expected at least 2 points for a sweep, got {alphas}")
        values = [round(float(a), 12) for a in np.linspace(0.0, 1.0, alphas)]
    else:
        values = [float(a) for a in alphas]
    if not values or any(not 0.0 <= a <= 1.0 for a in values):
        raise ConfigError(f"alphas: expected values in [0, 1], got {values}")
    trace = []
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None
    for alpha in values:
        merged = merge_state_dicts("linear", [zero_shot, fine_tuned], weights=[1 - alpha, alpha])
        s = float(score(merged))
        trace.append(Candidate({"alpha": alpha}, s))
        if best is None or s > best[0] or (s == best[0] and alpha < best[1]):
            best = (s, alpha, merged)
    return SearchResult({"alpha": best[1]}, best[2], best[0], tuple(trace))
