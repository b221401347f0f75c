"""The text study's comparison: per task, every candidate against that task's best single model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from modelfuse.demo.text.candidates import Candidate
from modelfuse.demo.text.settings import TextSettings
from modelfuse.demo.text.tasks import TextTask

__all__ = ["OWN_FINE_TUNE", "compare_candidates", "mean_interval"]

OWN_FINE_TUNE = "fine-tuned (own task)"
"""The candidate that normalised accuracy divides by."""


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def mean_interval(
    replicates: Sequence[np.ndarray], level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean over tasks of independently resampled statistics.

    Each task's test split is resampled on its own (its comparison's
    bootstrap replicates); replicate ``b`` of the mean is the mean over tasks
    of their replicate ``b`` (the shortest count is used).

    Examples
    --------
    >>> a, b = np.linspace(0, 1, 101), np.linspace(1, 2, 101)
    >>> tuple(round(x, 3) for x in mean_interval([a, b]))
    (0.525, 1.475)
    """
    n = min(len(r) for r in replicates)
    means = np.mean([np.asarray(r[:n], dtype=float) for r in replicates], axis=0)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def compare_candidates(
    candidates: Sequence[Candidate], tasks: Sequence[TextTask], settings: TextSettings, seed: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-task comparisons on the test splits and the table of the study.

    The reference of each task is the single model (a ``reference``-family
    candidate) with the best validation accuracy on it, chosen before the
    test split is looked at. Tests are paired bootstrap tests, Holm-adjusted
    over the candidates of that task.

    Returns
    -------
    comparisons : dict
        Task name -> :class:`~modelfuse.evaluation.Comparison`.
    table : list of dict
        Per candidate: ``name``, ``family``, ``accuracy`` / ``interval`` /
        ``normalized`` / ``pvalue`` / ``significant`` per task, ``mean_accuracy``,
        ``mean_interval``, ``mean_normalized``.
    """
    from modelfuse.evaluation import compare_predictions

    comparisons: dict[str, Any] = {}
    for task in tasks:
        singles = [c for c in candidates if c.family == "reference"]
        reference = max(singles, key=lambda c: c.accuracy(task, "val")).name
        comparisons[task.name] = compare_predictions(
            {c.name: _softmax(c.logits[task.name]["test"]) for c in candidates},
            task.labels["test"],
            reference=reference,
            n_resamples=settings.n_resamples,
            random_state=seed,
        )
    own = next(c for c in candidates if c.name == OWN_FINE_TUNE)
    table = []
    for candidate in candidates:
        row: dict[str, Any] = {"name": candidate.name, "family": candidate.family, "tasks": {}}
        replicates = []
        for task in tasks:
            comparison = comparisons[task.name]
            line = next(x for x in comparison.candidates if x.name == candidate.name)
            if not line.estimate.bootstrap_distribution.size:  # a duplicate shares another's
                line = next(x for x in comparison.candidates if x.name == line.same_as[0])
            accuracy = candidate.accuracy(task, "test")
            row["tasks"][task.name] = {
                "accuracy": accuracy,
                "interval": tuple(float(x) for x in line.estimate.ci),
                "normalized": accuracy / max(own.accuracy(task, "test"), 1e-12),
                "reference": comparison.reference,
                "difference": None if line.difference is None else line.difference.statistic,
                "pvalue": None if line.test is None else float(line.test.pvalue),
                "significant": line.significant,
            }
            replicates.append(line.estimate.bootstrap_distribution)
        cells = row["tasks"].values()
        row["mean_accuracy"] = float(np.mean([c["accuracy"] for c in cells]))
        row["mean_interval"] = mean_interval(replicates)
        row["mean_normalized"] = float(np.mean([c["normalized"] for c in cells]))
        table.append(row)
    return comparisons, table
