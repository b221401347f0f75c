"""Scoring the demo's candidates on the held-out test split, honestly.

Every candidate (a single model, a merge, an ensemble or a calibrated
predictor) is reduced to its log-probabilities on the validation and test
splits (and, for the soup scenario, a shifted test split). Choices
(hyperparameters, greedy soups, ensemble weights, temperatures, the reference
model) use the validation split only; the test splits are touched once,
here, for the metrics with their bootstrap intervals and the Holm-adjusted
paired bootstrap tests against the best individual model. Candidates with
identical predictions are one model (:func:`merge_duplicates`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "Entry",
    "Family",
    "MetricRow",
    "SplitComparison",
    "accuracy_of",
    "compare_entries",
    "compare_split",
    "log_probabilities",
    "merge_duplicates",
    "model_entry",
    "same_predictions",
    "probabilities",
    "verdict",
    "vote_entry",
]

Family = Literal["individual", "merge", "ensemble", "distilled", "calibrated"]
Split = Literal["val", "test", "shift"]


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
    family : {"individual", "merge", "ensemble", "distilled", "calibrated"}
    cost : int
        Networks run per prediction at inference (1 for a merge or a distilled ensemble, K for
        a K-member ensemble).
    details : str
        How it was built and what was chosen on the validation split.
    val, test : arrays of shape (n_samples, n_classes)
        Log-probabilities on the validation and test splits.
    shift : array of shape (n_samples, n_classes) or None
        Log-probabilities on the shifted test split (the soup scenario's).
    """

    name: str
    family: Family
    cost: int
    details: str
    val: np.ndarray
    test: np.ndarray
    shift: np.ndarray | None = field(default=None, repr=False)

    def split(self, name: Split) -> np.ndarray:
        """The log-probabilities on ``"val"``, ``"test"`` or ``"shift"``."""
        out = {"val": self.val, "test": self.test, "shift": self.shift}[name]
        if out is None:
            from modelfuse.errors import DataError

            raise DataError(f"{self.name}: no predictions on the {name!r} split")
        return out


@dataclass(frozen=True)
class MetricRow:
    """One candidate's test metrics, intervals and comparison with the reference.

    ``metrics[m]`` is ``(value, (low, high))``; ``differences[m]`` is
    ``(candidate - reference, (low, high), Holm-adjusted p)``, absent for the
    reference itself. The interval of the difference is the Holm-consistent
    one when the comparison gives it (``adjusted[m]`` is then True): it
    excludes 0 exactly when the Holm-adjusted p is at most 0.05.
    """

    name: str
    family: str
    cost: int
    details: str
    metrics: dict[str, tuple[float, tuple[float, float]]]
    differences: dict[str, tuple[float, tuple[float, float], float]]
    adjusted: dict[str, bool] = field(default_factory=dict)


def model_entry(
    name: str,
    family: Family,
    cost: int,
    details: str,
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    x_val: np.ndarray,
    x_test: np.ndarray,
    x_shift: np.ndarray | None = None,
) -> Entry:
    """The entry of ``model`` run with the weights ``state_dict``: its log-probabilities on
    ``x_val``, ``x_test`` (and ``x_shift`` when given).

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
    shift = None
    if x_shift is not None:
        shift = log_probabilities(predict_logits(model, state_dict, x_shift))
    return Entry(name, family, cost, details, val, test, shift)


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
    shift = None
    if all(m.shift is not None for m in members):
        shift = log_vote([m.shift for m in members])  # type: ignore[misc]
    return Entry(name, "ensemble", cost, details, val, test, shift)


SAME_TOLERANCE = 1e-9
"""Largest difference of any class probability between two predictions of the same model."""


def same_predictions(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two log-probability arrays are the same model's: every class probability equal
    to :data:`SAME_TOLERANCE` (float rounding, e.g. a one-member vote or a merge with weights
    0 and 1).

    Examples
    --------
    >>> a = np.log([[0.8, 0.2]])
    >>> same_predictions(a, a + 1e-12), same_predictions(a, np.log([[0.7, 0.3]]))
    (True, False)
    """
    if a.shape != b.shape:
        return False
    return bool(np.max(np.abs(probabilities(a) - probabilities(b)), initial=0.0) <= SAME_TOLERANCE)


def merge_duplicates(entries: Sequence[Entry]) -> tuple[list[Entry], dict[str, str]]:
    """One entry per distinct model: entries with identical predictions on every split merge.

    A merged entry keeps the first one's place, family and cost; its name
    lists every name (``"ft-1 = WiSE-FT"``) and its details say which are
    the same model. Identical means :func:`same_predictions` on the
    validation, test and (when present) shifted splits.

    Returns
    -------
    entries : list of Entry
    renamed : dict
        Every input name to the name of its merged entry.

    Examples
    --------
    >>> a = Entry("a", "individual", 1, "x", np.log([[0.8, 0.2]]), np.log([[0.6, 0.4]]))
    >>> b = Entry("b", "merge", 1, "y", a.val.copy(), a.test.copy())
    >>> merged, renamed = merge_duplicates([a, b])
    >>> [e.name for e in merged], renamed["b"]
    (['a = b'], 'a = b')
    """

    def same(x: Entry, y: Entry) -> bool:
        return all(
            (u is None and v is None)
            or (u is not None and v is not None and same_predictions(u, v))
            for u, v in ((x.val, y.val), (x.test, y.test), (x.shift, y.shift))
        )

    groups: list[list[Entry]] = []
    for entry in entries:
        for group in groups:
            if same(group[0], entry):
                group.append(entry)
                break
        else:
            groups.append([entry])
    out, renamed = [], {}
    for group in groups:
        head = group[0]
        if len(group) == 1:
            out.append(head)
            renamed[head.name] = head.name
            continue
        name = " = ".join(e.name for e in group)
        details = (
            head.details
            + "; "
            + "; ".join(
                f"{e.name} ({e.details}) has identical predictions and is the same model"
                for e in group[1:]
            )
        )
        out.append(replace(head, name=name, details=details))
        renamed.update({e.name: name for e in group})
    return out, renamed


@dataclass(frozen=True)
class SplitComparison:
    """The comparison of every entry on one labelled split.

    Attributes
    ----------
    rows : list of MetricRow
        One per entry, in order.
    notes : tuple of str
        What the statistics say beyond the table, for a reader: floors of the
        p-values when they matter, percentile fall-backs, the leader picked
        on the samples it is scored on (from
        :func:`modelfuse.evaluation.compare_predictions`), one per metric,
        each starting with the metric.
    family_size : int
        Distinct models compared with the reference.
    n_test_resamples : int
        Paired bootstrap resamples behind each test.
    p_floor : float or None
        The smallest Holm-adjusted p-value those resamples can give.
    """

    rows: list[MetricRow]
    notes: tuple[str, ...]
    family_size: int
    n_test_resamples: int
    p_floor: float | None


def compare_split(
    entries: Sequence[Entry],
    labels: np.ndarray,
    reference: str,
    *,
    split: Literal["test", "shift"] = "test",
    metrics: Sequence[str] = ("accuracy", "nll", "ece"),
    n_resamples: int,
    seed: int,
    interval: Literal["bca", "percentile"] = "bca",
    groups: np.ndarray | None = None,
) -> SplitComparison:
    """Metrics of every entry on one split with 95% bootstrap intervals and paired bootstrap tests.

    One :func:`modelfuse.evaluation.compare_predictions` per metric, each over
    all entries, with the paired bootstrap test: the p-value is read off the
    same resampled differences as the interval, Holm-adjusted over the
    distinct models, and the difference's interval is the Holm-consistent one
    (it excludes 0 exactly when the adjusted p is at most 0.05). ``groups``
    (e.g. the image each view of the multi-task scenario comes from)
    resamples whole groups. Entries should be distinct models
    (:func:`merge_duplicates`).
    """
    from modelfuse.evaluation import compare_predictions

    predictions = {e.name: probabilities(e.split(split)) for e in entries}
    results = {}
    for i, metric in enumerate(metrics):
        results[metric] = compare_predictions(
            predictions,
            labels,
            reference=reference,
            metric=metric,
            test="bootstrap",
            n_resamples=n_resamples,
            interval=interval,
            random_state=seed + i,
            groups=groups,
        )
    rows = []
    for j, entry in enumerate(entries):
        values: dict[str, tuple[float, tuple[float, float]]] = {}
        diffs: dict[str, tuple[float, tuple[float, float], float]] = {}
        adjusted: dict[str, bool] = {}
        for metric, comparison in results.items():
            candidate = comparison.candidates[j]
            ci = candidate.estimate.ci
            values[metric] = (float(candidate.estimate.statistic), (float(ci[0]), float(ci[1])))
            if candidate.difference is not None and candidate.test is not None:
                d = candidate.adjusted_difference or candidate.difference
                diffs[metric] = (
                    float(d.statistic),
                    (float(d.ci[0]), float(d.ci[1])),
                    float(candidate.test.pvalue),
                )
                adjusted[metric] = candidate.adjusted_difference is not None
        rows.append(
            MetricRow(entry.name, entry.family, entry.cost, entry.details, values, diffs, adjusted)
        )
    notes = tuple(
        f"{metric}: {note}"
        for metric, comparison in results.items()
        for note in comparison.notes
        if "identical predictions" not in note
    )
    first = next(iter(results.values()))
    floors = [c.p_floor for c in results.values() if c.p_floor is not None]
    return SplitComparison(
        rows,
        notes,
        first.family_size,
        int(first.n_test_resamples or 0),
        max(floors) if floors else None,
    )


def compare_entries(
    entries: Sequence[Entry],
    labels: np.ndarray,
    reference: str,
    *,
    metrics: Sequence[str] = ("accuracy", "nll", "ece"),
    n_resamples: int,
    seed: int,
    interval: Literal["bca", "percentile"] = "bca",
    groups: np.ndarray | None = None,
) -> list[MetricRow]:
    """The rows of :func:`compare_split` on the test split."""
    return compare_split(
        entries,
        labels,
        reference,
        metrics=metrics,
        n_resamples=n_resamples,
        seed=seed,
        interval=interval,
        groups=groups,
    ).rows


def verdict(
    row: MetricRow, metric: str = "accuracy", *, greater_is_better: bool = True, alpha: float = 0.05
) -> str:
    """``"better"``, ``"worse"``, ``"no significant difference"`` or ``"reference"``.

    Significant means a Holm-adjusted p at most ``alpha`` (as
    :func:`modelfuse.evaluation.compare_predictions` decides it); the
    direction is the sign of the difference to the reference.

    Examples
    --------
    >>> r = MetricRow("m", "merge", 1, "", {}, {"accuracy": (-0.02, (-0.03, -0.01), 0.01)})
    >>> verdict(r)
    'worse'
    """
    if metric not in row.differences:
        return "reference"
    diff, _, p = row.differences[metric]
    if p > alpha or diff == 0:
        return "no significant difference"
    return "better" if (diff > 0) == greater_is_better else "worse"
