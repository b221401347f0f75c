"""Evolutionary search over per-checkpoint coefficients (LCSC)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.state_dict import merge_state_dicts
from modelfuse.search._state import check_matching
from modelfuse.search.results import Candidate, SearchResult
from modelfuse.search.scores import Score

__all__ = ["evolutionary_search"]


def evolutionary_search(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    score: Score,
    *,
    generations: int = 20,
    population: int | None = None,
    sigma: float = 0.1,
    init: Sequence[float] | None = None,
    seed: int = 0,
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

    def evaluate(w: np.ndarray) -> tuple[float, dict[str, torch.Tensor]]:
        merged = merge_state_dicts(
            "linear", state_dicts, weights=[float(v) for v in w], normalize=False
        )
        return float(score(merged)), merged

    best_score, best_sd = evaluate(mean)
    best_w = mean.copy()
    trace = [Candidate({"weights": tuple(float(v) for v in mean), "generation": 0}, best_score)]
    path = np.zeros(k)
    step = float(sigma)
    for generation in range(1, generations + 1):
        z = rng.standard_normal((lam, k))
        scores = np.empty(lam)
        for i in range(lam):
            w = mean + step * z[i]
            s, merged = evaluate(w)
            scores[i] = s
            trace.append(
                Candidate({"weights": tuple(float(v) for v in w), "generation": generation}, s)
            )
            if s > best_score:
                best_score, best_sd, best_w = s, merged, w.copy()
        order = np.argsort(-scores, kind="stable")[:mu]
        z_w = rank_weights @ z[order]
        mean = mean + step * z_w
        path = (1 - c_sigma) * path + math.sqrt(c_sigma * (2 - c_sigma) * mu_eff) * z_w
        step *= math.exp((c_sigma / d_sigma) * (np.linalg.norm(path) / expected_norm - 1))
    return SearchResult(
        {"weights": tuple(float(v) for v in best_w)}, best_sd, best_score, tuple(trace)
    )
