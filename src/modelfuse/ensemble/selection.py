"""Caruana ensemble selection: greedy forward selection of members, with replacement.

Each round scores every member as a candidate addition to the running
ensemble at once, from running sums (the sum of the chosen members'
probabilities and of their true-class probabilities), so a round costs one
vectorised pass over (n_models, n_samples[, n_classes]) and the average is
never recomputed from the chosen members.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from modelfuse.arrays import check_labels
from modelfuse.calibration.metrics import brier_score, negative_log_likelihood
from modelfuse.ensemble.diversity import pairwise_diversity, uncertainty_decomposition
from modelfuse.ensemble.voting import Kind, check_ensemble_predictions, member_probabilities
from modelfuse.ensemble.weights import true_class_probabilities
from modelfuse.errors import ConfigError

__all__ = ["SELECTION_METRICS", "SelectionResult", "caruana_selection"]

SelectionMetric = Literal["nll", "brier", "accuracy"]
_EPS = 1e-12
_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class SelectionResult:
    """What :func:`caruana_selection` chose.

    Attributes
    ----------
    weights : array of shape (n_models,)
        ``counts / counts.sum()`` (averaged over bags when bagging).
    counts : array of shape (n_models,)
        How often each member was chosen (summed over bags).
    trajectory : array
        Validation loss after each addition (first bag when bagging); the
        loss is the NLL, the Brier score, or the error rate ``1 - accuracy``.
    best_iteration : int
        Number of additions kept (the trajectory's first minimum, 1-based).
    loss : float
        Validation loss of the returned weights.
    metric : str
    gain : float
        ``best single member's loss - loss``: what the selection bought
        (>= 0 without bagging).
    disagreement : float
        Mean pairwise disagreement of the selected members (each counted
        once; 0 when one member is selected), see
        :func:`modelfuse.ensemble.diversity.pairwise_diversity`.
    mutual_information : float
        Mean mutual information (nats) of the selected members under the
        returned weights, see
        :func:`modelfuse.ensemble.diversity.uncertainty_decomposition`.
    """

    weights: np.ndarray
    counts: np.ndarray
    trajectory: np.ndarray
    best_iteration: int
    loss: float
    metric: str
    gain: float = 0.0
    disagreement: float = 0.0
    mutual_information: float = 0.0


class _Running:
    """Running sums of the chosen members and the loss of every candidate addition."""

    def __init__(self, probs: np.ndarray, labels: np.ndarray, true_p: np.ndarray) -> None:
        self.probs, self.labels, self.true_p = probs, labels, true_p
        self.total = np.zeros(probs.shape[1:], dtype=np.float64)
        self.total_true = np.zeros(probs.shape[1], dtype=np.float64)
        self.size = 0
        self._squares: np.ndarray | None = None

    def add(self, member: int) -> None:
        self.total += self.probs[member]
        self.total_true += self.true_p[member]
        self.size += 1

    def nll(self, members: np.ndarray) -> np.ndarray:
        mix = (self.total_true[None, :] + self.true_p[members]) / (self.size + 1)
        return -np.log(np.maximum(mix, _EPS)).mean(axis=1)

    def brier(self, members: np.ndarray) -> np.ndarray:
        # sum_c (S + P_m)^2 = |S|^2 + 2 S.P_m + |P_m|^2, with |P_m|^2 computed once
        if self._squares is None:
            self._squares = np.einsum("mnk,mnk->mn", self.probs, self.probs, dtype=np.float64)
        k = self.size + 1
        cross = np.einsum("mnk,nk->mn", self.probs[members], self.total.astype(self.probs.dtype))
        square = (self.total**2).sum(axis=1)[None, :] + 2 * cross + self._squares[members]
        true = self.total_true[None, :] + self.true_p[members]
        return (square / k**2 - 2 * true / k + 1).mean(axis=1)

    def accuracy(self, members: np.ndarray) -> np.ndarray:
        errors = np.empty(len(members))
        total = self.total.astype(self.probs.dtype)
        per_chunk = max(1, _CHUNK_ELEMENTS // total.size)
        for start in range(0, len(members), per_chunk):
            chunk = members[start : start + per_chunk]
            predicted = (self.probs[chunk] + total[None]).argmax(axis=2)
            errors[start : start + per_chunk] = (predicted != self.labels[None, :]).mean(axis=1)
        return errors


class _Metric(NamedTuple):
    candidates: Callable[[_Running, np.ndarray], np.ndarray]  # loss of each addition
    loss: Callable[[np.ndarray, np.ndarray], float]  # loss of given probabilities


SELECTION_METRICS: dict[str, _Metric] = {
    "nll": _Metric(_Running.nll, lambda p, y: negative_log_likelihood(p, y, eps=_EPS)),
    "brier": _Metric(_Running.brier, brier_score),
    "accuracy": _Metric(_Running.accuracy, lambda p, y: float((p.argmax(axis=1) != y).mean())),
}


def _hill_climb(
    running: _Running,
    members: np.ndarray,
    score: Callable[[_Running, np.ndarray], np.ndarray],
    n_rounds: int,
    n_init: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """The chosen members in order and the loss after each addition."""
    chosen: list[int] = []
    losses: list[float] = []
    if n_init:
        single = score(_fresh(running), members)  # each member alone
        for j in np.argsort(single, kind="stable")[:n_init]:
            losses.append(float(score(running, members[[j]])[0]))
            running.add(int(members[j]))
            chosen.append(int(members[j]))
    for _ in range(n_rounds):
        loss = score(running, members)
        best = loss.min()
        ties = np.flatnonzero(loss <= best + 1e-12 * max(1.0, abs(best)))
        pick = int(members[ties[rng.integers(len(ties))] if len(ties) > 1 else ties[0]])
        running.add(pick)
        chosen.append(pick)
        losses.append(float(best))
    return np.array(chosen), np.array(losses)


def _fresh(running: _Running) -> _Running:
    fresh = _Running(running.probs, running.labels, running.true_p)
    fresh._squares = running._squares
    return fresh


def caruana_selection(
    predictions: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    kind: Kind,
    n_rounds: int = 25,
    metric: SelectionMetric = "nll",
    n_init: int = 0,
    n_bags: int = 0,
    bag_fraction: float = 0.5,
    random_state: int | np.random.Generator | None = None,
) -> SelectionResult:
    """Ensemble selection from a library of models (Caruana et al. 2004).

    Start from the empty ensemble (or the ``n_init`` best members, each
    added once, best first); in every round add, with replacement, the
    member whose addition gives the lowest validation loss of the averaged
    probabilities; ties are broken by a seeded random draw. The returned
    ensemble is the trajectory's best prefix (best-iteration truncation), so
    without bagging its validation loss is never above that of the best
    single member. Weights are ``counts / size``. The result reports the
    gain over the best single member beside the selected members' diversity
    (disagreement and mutual information), which is what buys the gain.

    Parameters
    ----------
    predictions : array of shape (n_models, n_samples, n_classes) or a sequence
    labels : array of shape (n_samples,)
    kind : {"probabilities", "logits"}
        Logits are softmaxed per member; probabilities are averaged.
    n_rounds : int, default 25
        Greedy additions after the initialisation.
    metric : {"nll", "brier", "accuracy"}, default "nll"
        Validation loss to minimise (``"accuracy"`` minimises the error rate).
    n_init : int, default 0
        Sorted initialisation with the ``n_init`` best members.
    n_bags : int, default 0
        With ``n_bags > 0``, run the selection ``n_bags`` times, each on a
        random ``bag_fraction`` of the members (Caruana et al. use 20 bags
        of half the library), and average the bags' weights. The guarantee
        against the best member then no longer holds.
    bag_fraction : float, default 0.5
    random_state : int or numpy Generator, optional
        Seeds the tie-breaks and the bags.

    Returns
    -------
    SelectionResult

    References
    ----------
    Caruana, Niculescu-Mizil, Crew, Ksikes. Ensemble selection from libraries
    of models. ICML 2004.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> p = rng.dirichlet(np.ones(3), size=(4, 50)); y = rng.integers(0, 3, size=50)
    >>> result = caruana_selection(p, y, kind="probabilities", n_rounds=10, random_state=0)
    >>> float(result.weights.sum())
    1.0
    """
    if metric not in SELECTION_METRICS:
        raise ConfigError(
            f"metric: unknown {metric!r}; expected one of {', '.join(SELECTION_METRICS)}"
        )
    for name, value in (("n_rounds", n_rounds), ("n_init", n_init), ("n_bags", n_bags)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigError(f"{name}: expected an integer >= 0, got {value!r}")
    if n_rounds + n_init < 1:
        raise ConfigError("n_rounds: with n_init = 0 at least one round is needed")
    if not 0 < bag_fraction <= 1:
        raise ConfigError(f"bag_fraction: expected a number in (0, 1], got {bag_fraction!r}")
    p = member_probabilities(check_ensemble_predictions(predictions, kind), kind)
    y = check_labels(labels, n_samples=p.shape[1], n_classes=p.shape[2])
    n_models = p.shape[0]
    rng = np.random.default_rng(random_state)
    running = _Running(p, y, true_class_probabilities(p, y))
    score = SELECTION_METRICS[metric].candidates

    if n_bags:
        bag_size = max(1, int(round(bag_fraction * n_models)))
        bags = [np.sort(rng.choice(n_models, bag_size, replace=False)) for _ in range(n_bags)]
    else:
        bags = [np.arange(n_models)]
    counts = np.zeros(n_models, dtype=np.int64)
    weights = np.zeros(n_models)
    first_trajectory, first_best = np.empty(0), 0
    for b, bag in enumerate(bags):
        chosen, trajectory = _hill_climb(
            _fresh(running), bag, score, n_rounds, min(n_init, len(bag)), rng
        )
        best = int(np.argmin(trajectory)) + 1
        bag_counts = np.bincount(chosen[:best], minlength=n_models)
        counts += bag_counts
        weights += bag_counts / best
        if b == 0:
            first_trajectory, first_best = trajectory, best
    weights /= len(bags)
    loss = SELECTION_METRICS[metric].loss(np.tensordot(weights, p, axes=(0, 0)), y)
    best_single = float(score(_fresh(running), np.arange(n_models)).min())
    selected = np.flatnonzero(weights > 0)
    diversity = pairwise_diversity(p[selected], kind="probabilities")
    uncertainty = uncertainty_decomposition(
        p[selected], kind="probabilities", weights=weights[selected]
    )
    return SelectionResult(
        weights=weights,
        counts=counts,
        trajectory=first_trajectory,
        best_iteration=first_best,
        loss=loss,
        metric=metric,
        gain=best_single - loss,
        disagreement=diversity.mean_disagreement,
        mutual_information=uncertainty.mean_epistemic,
    )
