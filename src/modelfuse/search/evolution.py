"""Evolutionary search over per-checkpoint coefficients (LCSC)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from modelfuse.errors import ConfigError
from modelfuse.executors import Executor
from modelfuse.merge.state_dict import merge_state_dicts
from modelfuse.search._evaluation import describe, evaluate_all
from modelfuse.search._state import check_matching
from modelfuse.search.results import Candidate, SearchResult
from modelfuse.search.scores import Score

__all__ = ["evolutionary_search"]


def _combine(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """:math:`\\sum_k w_k \\theta_k`, not normalised (float tensors; others from the first)."""
    return merge_state_dicts("linear", state_dicts, weights=list(weights), normalize=False)


class _ScoreCombination:
    """Score the combination of the checkpoints with given coefficients; picklable."""

    def __init__(self, state_dicts: Sequence[Mapping[str, torch.Tensor]], score: Score) -> None:
        self.state_dicts = state_dicts
        self.score = score

    def __repr__(self) -> str:
        return f"the score {describe(self.score)} of checkpoint combinations"

    def __call__(self, weights: tuple[float, ...]) -> float:
        return float(self.score(_combine(self.state_dicts, weights)))


def evolutionary_search(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    score: Score,
    *,
    generations: int = 20,
    population: int | None = None,
    sigma: float = 0.1,
    init: Sequence[float] | None = None,
    seed: int = 0,
    executor: Executor | None = None,
) -> SearchResult:
    """Find the coefficients of :math:`\\theta = \\sum_k w_k \\theta_k` by an evolution strategy.

    The strategy is a :math:`(\\mu/\\mu_w, \\lambda)`-ES with cumulative
    step-size adaptation, i.e. CMA-ES without covariance adaptation: each
    generation draws ``population`` (:math:`\\lambda`) candidates
    :math:`w_i = m + \\sigma z_i`, :math:`z_i \\sim N(0, I)`, scores them,
    moves the mean to the log-rank-weighted average of the best
    :math:`\\mu = \\lfloor\\lambda/2\\rfloor` and adapts :math:`\\sigma` from the
    length of the evolution path (Hansen, "The CMA evolution strategy: a
    tutorial", 2016, with :math:`C = I`). The combination is not normalised,
    as in LCSC: the coefficients may sum to anything.

    The best candidate ever scored is returned (the initial mean is scored
    first), so the result is never worse than ``init`` on the score's data.

    Parameters
    ----------
    state_dicts : sequence of mappings name -> Tensor
        Checkpoints of one architecture (e.g. saved along one training run).
        Not modified.
    score : callable
        ``score(state_dict) -> float`` on held-out data, higher is better.
    generations : int, default 20
        Generations of the strategy; ``1 + generations * population`` scores
        are computed.
    population : int, optional
        Candidates per generation, default :math:`4 + \\lfloor 3 \\ln K \\rfloor`
        for ``K`` checkpoints (at least 2).
    sigma : float, default 0.1
        Initial step size in coefficient space.
    init : sequence of float, optional
        Initial mean; default the uniform average :math:`w_k = 1/K`.
    seed : int, default 0
        Seed of the ``numpy.random.Generator``; equal seeds give equal traces.
    executor : Executor, optional
        Evaluates each generation's ``population`` candidates (combine and
        score) in one call, in parallel, e.g.
        ``modelfuse.executors.LocalExecutor(workers=2)`` or ``RayExecutor()``
        (the initial mean goes with the first generation); generations run
        one after another, as each one's mean depends on the previous scores.
        With worker processes ``score`` must be picklable (see
        :mod:`modelfuse.executors`). None (default) evaluates the candidates
        one by one in this process. The result is the same either way.

    Returns
    -------
    SearchResult
        ``parameters``: ``{"weights": tuple of K floats}``; ``state_dict``:
        :math:`\\sum_k w_k \\theta_k` (float tensors; others from the first
        checkpoint); ``trace``: every candidate in order, each
        ``{"weights": ..., "generation": g}`` (generation 0 is ``init``).

    References
    ----------
    Liu et al., "Linear combination of saved checkpoints makes consistency and
    diffusion models better" (LCSC), ICLR 2025.

    Examples
    --------
    >>> sds = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    >>> target = torch.tensor([0.3, 0.9])
    >>> score = lambda sd: -float(((sd["w"] - target) ** 2).sum())
    >>> r = evolutionary_search(sds, score, generations=40, seed=0)
    >>> [round(w, 2) for w in r.parameters["weights"]]
    [0.3, 0.9]
    """
    check_matching(state_dicts)
    k = len(state_dicts)
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 0:
        raise ConfigError(f"generations: expected a non-negative integer, got {generations!r}")
    lam = max(2, 4 + int(3 * math.log(k))) if population is None else population
    if isinstance(lam, bool) or not isinstance(lam, int) or lam < 2:
        raise ConfigError(f"population: expected an integer >= 2, got {population!r}")
    if not sigma > 0:
        raise ConfigError(f"sigma: expected a positive step size, got {sigma!r}")
    mean = np.full(k, 1.0 / k) if init is None else np.asarray(init, dtype=np.float64).copy()
    if mean.shape != (k,) or not np.all(np.isfinite(mean)):
        raise ConfigError(
            f"init: expected {k} finite coefficients, one per checkpoint, got {init!r}"
        )

    mu = lam // 2
    ranks = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    rank_weights = ranks / ranks.sum()
    mu_eff = 1.0 / float(np.sum(rank_weights**2))
    c_sigma = (mu_eff + 2) / (k + mu_eff + 5)
    d_sigma = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (k + 1)) - 1) + c_sigma
    expected_norm = math.sqrt(k) * (1 - 1 / (4 * k) + 1 / (21 * k * k))
    rng = np.random.default_rng(seed)

    evaluate = _ScoreCombination(state_dicts, score)
    trace: list[Candidate] = []

    def score_all(candidates: list[tuple[tuple[float, ...], int]]) -> list[float]:
        """Score (weights, generation) pairs in one executor call; append them to the trace."""
        scores = evaluate_all(executor, evaluate, [w for w, _ in candidates])
        for (w, g), s in zip(candidates, scores):
            trace.append(Candidate({"weights": w, "generation": g}, s))
        return scores

    waiting = [(tuple(float(v) for v in mean), 0)]  # the initial mean, scored with generation 1
    path = np.zeros(k)
    step = float(sigma)
    for generation in range(1, generations + 1):
        z = rng.standard_normal((lam, k))
        population = [(tuple(float(v) for v in mean + step * row), generation) for row in z]
        scores = np.asarray(score_all(waiting + population)[len(waiting) :])
        waiting = []
        order = np.argsort(-scores, kind="stable")[:mu]
        z_w = rank_weights @ z[order]
        mean = mean + step * z_w
        path = (1 - c_sigma) * path + math.sqrt(c_sigma * (2 - c_sigma) * mu_eff) * z_w
        step *= math.exp((c_sigma / d_sigma) * (np.linalg.norm(path) / expected_norm - 1))
    if waiting:  # generations=0: only the initial mean
        score_all(waiting)
    best = 0  # the first best candidate; the initial mean unless one scores strictly higher
    for index, candidate in enumerate(trace):
        if candidate.score > trace[best].score:
            best = index
    best_w = trace[best].parameters["weights"]
    return SearchResult(
        {"weights": best_w}, _combine(state_dicts, best_w), trace[best].score, tuple(trace)
    )
