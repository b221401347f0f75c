"""Scoring the demo's candidates on the held-out test split, honestly.

Every candidate (a single model, a merge, an ensemble or a calibrated
predictor) is reduced to its log-probabilities on the validation and test
splits. Choices (hyperparameters, greedy soups, ensemble weights,
temperatures, the reference model) use the validation split only; the test
split is touched once, here, for the metrics with their bootstrap intervals
and the Holm-adjusted paired tests against the best individual model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "Entry",
    "Family",
    "MetricRow",
    "accuracy_of",
    "compare_entries",
    "log_probabilities",
    "model_entry",
    "probabilities",
    "verdict",
    "vote_entry",
]

Family = Literal["individual", "merge", "ensemble", "calibrated"]


def log_probabilities(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (log-probabilities are logits of the same prediction).

    Examples
    --------
    >>> np.exp(log_probabilities(np.array([[0.0, 0.0]])))
    array([[0.5, 0.5]])
    """
    from modelfuse.calibration.softmax import log_softmax

    return log_softmax(np.asarray(logits, dtype=np.float64))


def probabilities(log_probs: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits or log-probabilities, in float64."""
    return np.exp(log_probabilities(log_probs))


def accuracy_of(log_probs: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose largest log-probability (or logit) is at the label (first on ties).

    Examples
    --------
    >>> accuracy_of(np.log([[0.9, 0.1], [0.6, 0.4]]), np.array([0, 1]))
    0.5
    """
    return float(np.mean(np.asarray(log_probs).argmax(axis=1) == y))


@dataclass(frozen=True)
class Entry:
    """One candidate of a comparison.

    Attributes
    ----------
    name : str
    family : {"individual", "merge", "ensemble", "calibrated"}
    cost : int
        Networks run per prediction at inference (1 for a merge, K for a K-member ensemble).
    details : str
        How it was built and what was chosen on the validation split.
    val, test : arrays of shape (n_samples, n_classes)
        Log-probabilities on the validation and test splits.
    """

    name: str
    family: Family
    cost: int
    details: str
    val: np.ndarray
    test: np.ndarray


@dataclass(frozen=True)
class MetricRow:
    """One candidate's test metrics, intervals and comparison with the reference.

    ``metrics[m]`` is ``(value, (low, high))``; ``differences[m]`` is
    ``(candidate - reference, (low, high), Holm-adjusted p)``, absent for the
    reference itself.
    """

    name: str
    family: str
    cost: int
    details: str
    metrics: dict[str, tuple[float, tuple[float, float]]]
    differences: dict[str, tuple[float, tuple[float, float], float]]


def model_entry(
    name: str,
    family: Family,
    cost: int,
    details: str,
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    x_val: np.ndarray,
    x_test: np.ndarray,
) -> Entry:
    """The entry of ``model`` run with the weights ``state_dict``: its log-probabilities on
    ``x_val`` and ``x_test``.

    Examples
    --------
    >>> from modelfuse.demo.zoo import make_mlp
    >>> net = make_mlp(4)
    >>> x = np.zeros((3, 64), dtype=np.float32)
    >>> e = model_entry("m", "merge", 1, "", net, net.state_dict(), x, x[:2])
    >>> e.val.shape, e.test.shape, bool(np.allclose(np.exp(e.test).sum(1), 1))
    ((3, 10), (2, 10), True)
    """
    from modelfuse.demo.zoo import predict_logits

    val = log_probabilities(predict_logits(model, state_dict, x_val))
    test = log_probabilities(predict_logits(model, state_dict, x_test))
    return Entry(name, family, cost, details, val, test)


def vote_entry(
    name: str,
    members: Sequence[Entry],
    cost: int,
    details: str,
    *,
    weights: np.ndarray | None = None,
) -> Entry:
    """The soft vote (mean probabilities, ``weights`` if given) of ``members`` as an ensemble entry.

    Examples
    --------
    >>> a = Entry("a", "individual", 1, "", np.log([[0.8, 0.2]]), np.log([[0.6, 0.4]]))
    >>> b = Entry("b", "individual", 1, "", np.log([[0.4, 0.6]]), np.log([[0.2, 0.8]]))
    >>> np.exp(vote_entry("vote", [a, b], 2, "").test).round(6)
    array([[0.4, 0.6]])
    """
    from modelfuse.ensemble import soft_vote

    def log_vote(predictions: list[np.ndarray]) -> np.ndarray:
        return np.log(soft_vote(np.stack(predictions), kind="logits", weights=weights))

    val = log_vote([m.val for m in members])
    test = log_vote([m.test for m in members])
    return Entry(name, "ensemble", cost, details, val, test)


_TESTS = {"accuracy": "mcnemar", "nll": "permutation", "ece": "permutation"}
"""The paired test against the reference per metric: exact McNemar for accuracy,
a paired permutation test (swapping the two models' predictions sample by
sample) for NLL and ECE."""


def compare_entries(
    entries: Sequence[Entry],
    labels: np.ndarray,
    reference: str,
    *,
    metrics: Sequence[str] = ("accuracy", "nll", "ece"),
    n_resamples: int,
    seed: int,
    interval: Literal["bca", "percentile"] = "bca",
) -> list[MetricRow]:
    """Test-split metrics of every entry with 95% bootstrap intervals and Holm-adjusted paired tests.

    One :func:`modelfuse.evaluation.compare_predictions` per metric, each over
    all entries, so the Holm adjustment covers every candidate compared with
    ``reference``.
    """
    from modelfuse.evaluation import compare_predictions

    predictions = {e.name: probabilities(e.test) for e in entries}
    results = {}
    for i, metric in enumerate(metrics):
        results[metric] = compare_predictions(
            predictions,
            labels,
            reference=reference,
            metric=metric,
            test=_TESTS.get(metric, "permutation"),
            n_resamples=n_resamples,
            interval=interval,
            random_state=seed + i,
        )
    rows = []
    for j, entry in enumerate(entries):
        values: dict[str, tuple[float, tuple[float, float]]] = {}
        diffs: dict[str, tuple[float, tuple[float, float], float]] = {}
        for metric, comparison in results.items():
            candidate = comparison.candidates[j]
            ci = candidate.estimate.ci
            values[metric] = (float(candidate.estimate.statistic), (float(ci[0]), float(ci[1])))
            if candidate.difference is not None and candidate.test is not None:
                d = candidate.difference
                diffs[metric] = (
                    float(d.statistic),
                    (float(d.ci[0]), float(d.ci[1])),
                    float(candidate.test.pvalue),
                )
        rows.append(MetricRow(entry.name, entry.family, entry.cost, entry.details, values, diffs))
    return rows


def verdict(
    row: MetricRow, metric: str = "accuracy", *, greater_is_better: bool = True, alpha: float = 0.05
) -> str:
    """``"better"``, ``"worse"``, ``"no significant difference"`` or ``"reference"``.

    Significant means a Holm-adjusted p below ``alpha``; the direction is the
    sign of the difference to the reference.

    Examples
    --------
    >>> r = MetricRow("m", "merge", 1, "", {}, {"accuracy": (-0.02, (-0.03, -0.01), 0.01)})
    >>> verdict(r)
    'worse'
    """
    if metric not in row.differences:
        return "reference"
    diff, _, p = row.differences[metric]
    if p >= alpha or diff == 0:
        return "no significant difference"
    return "better" if (diff > 0) == greater_is_better else "worse"
