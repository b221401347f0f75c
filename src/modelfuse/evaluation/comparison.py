"""Compare several models' predictions on one labelled set: the core of ``modelfuse compare``.

Each candidate gets its metric with a bootstrap interval, its paired
difference to a reference with a paired-bootstrap interval, and a paired
test against the reference whose p-values are Holm-adjusted over the
candidates. With three or more candidates the samples are also cut into
disjoint (stratified) blocks and the candidates ranked per block for a
Friedman test and Nemenyi's critical difference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation.bootstrap import (
    INTERVAL_METHODS,
    IntervalMethod,
    RandomState,
    _generator,
    bootstrap_metric,
    paired_bootstrap,
)
from modelfuse.evaluation.metrics import PredictionKind, get_metric, prepare_predictions
from modelfuse.evaluation.paired_tests import mcnemar, metric_permutation_test
from modelfuse.evaluation.ranking import friedman_test, holm
from modelfuse.evaluation.results import FriedmanResult, IntervalResult, TestResult

__all__ = ["COMPARISON_TESTS", "CandidateComparison", "Comparison", "compare_predictions"]

COMPARISON_TESTS: dict[str, str] = {
    "permutation": "paired permutation test of the metric difference (any metric)",
    "bootstrap": "the paired bootstrap p-value of the metric difference (any metric)",
    "mcnemar": "exact McNemar test (accuracy only)",
}
"""Tests of each candidate against the reference, by name."""


@dataclass(frozen=True)
class CandidateComparison:
    """One candidate's line of a comparison.

    Attributes
    ----------
    name : str
    estimate : IntervalResult
        The metric with its interval.
    difference : IntervalResult or None
        ``metric(candidate) - metric(reference)`` with its paired interval;
        ``None`` for the reference itself.
    test : TestResult or None
        The test against the reference; ``pvalue`` is Holm-adjusted over all
        candidates, ``raw_pvalue`` keeps the unadjusted one.
    raw_pvalue : float or None
    """

    name: str
    estimate: IntervalResult
    difference: IntervalResult | None = None
    test: TestResult | None = None
    raw_pvalue: float | None = None

    def __str__(self) -> str:
        parts = [f"{self.name}: {self.estimate}"]
        if self.difference is not None:
            parts.append(str(self.difference))
        if self.test is not None:
            parts.append(str(self.test))
        return "; ".join(parts)


@dataclass(frozen=True)
class Comparison:
    """Every candidate against a reference on one labelled set.

    Attributes
    ----------
    metric : str
    greater_is_better : bool
    reference : str
    candidates : tuple of CandidateComparison
        In input order; the reference is among them.
    friedman : FriedmanResult or None
        Over disjoint blocks of the samples, for three or more candidates.
    block_scores : numpy.ndarray
        The (n_blocks, n_candidates) metric values the Friedman test ranked.
    confidence_level : float
    n_samples : int
    test : str
        The test against the reference (a key of :data:`COMPARISON_TESTS`).
    """

    metric: str
    greater_is_better: bool
    reference: str
    candidates: tuple[CandidateComparison, ...]
    friedman: FriedmanResult | None
    confidence_level: float
    n_samples: int
    test: str
    block_scores: np.ndarray = field(
        default_factory=lambda: np.empty((0, 0)), repr=False, compare=False
    )

    def __str__(self) -> str:
        head = (
            f"{self.metric} of {len(self.candidates)} candidates on {self.n_samples} samples, "
            f"reference {self.reference}"
        )
        lines = [head, *(f"  {c}" for c in self.candidates)]
        if self.friedman is not None:
            lines.append(f"  {self.friedman}")
        return "\n".join(lines)


def _blocks(labels: np.ndarray, n_blocks: int, seed: int) -> list[np.ndarray]:
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(labels)
    if counts[counts > 0].min() >= n_blocks:
        splitter = StratifiedKFold(n_splits=n_blocks, shuffle=True, random_state=seed)
        return [test for _, test in splitter.split(np.zeros(len(labels)), labels)]
    splitter = KFold(n_splits=n_blocks, shuffle=True, random_state=seed)
    return [test for _, test in splitter.split(np.zeros(len(labels)))]


def compare_predictions(
    predictions: Mapping[str, np.ndarray],
    labels: np.ndarray,
    *,
    reference: str | None = None,
    metric: str = "accuracy",
    kind: PredictionKind = "probabilities",
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    interval: IntervalMethod = "bca",
    test: Literal["permutation", "bootstrap", "mcnemar"] = "permutation",
    stratify: bool = False,
    n_blocks: int = 10,
    alpha: float = 0.05,
    random_state: RandomState = 0,
) -> Comparison:
    """Compare candidates' predictions of the same samples against a reference.

    Parameters
    ----------
    predictions : mapping of str to array of shape (n_samples, n_classes)
        Candidate name to its probabilities (or logits with ``kind="logits"``).
    labels : array of shape (n_samples,)
    reference : str, optional
        The candidate the others are compared with (default: the first).
    metric : str
        A key of :data:`modelfuse.evaluation.metrics.METRICS`.
    kind : {"probabilities", "logits"}
    confidence_level : float
    n_resamples : int
        Bootstrap resamples, and permutations of the permutation test.
    interval : {"bca", "percentile"}
    test : {"permutation", "bootstrap", "mcnemar"}
        The paired test against the reference; p-values are Holm-adjusted.
    stratify : bool
        Stratified bootstrap resampling.
    n_blocks : int
        Disjoint blocks of samples (stratified when every class has at least
        ``n_blocks`` samples) for the Friedman test and critical difference.
        Needs three or more candidates; skipped (``friedman=None``) with fewer
        than ``2 n_blocks`` samples or when the metric is undefined on a block
        (AUROC on a block missing a class).
    alpha : float
        Level of Nemenyi's critical difference.
    random_state : int or numpy.random.Generator
        Seeds everything; equal seeds give equal comparisons.

    Returns
    -------
    Comparison

    References
    ----------
    Demšar, "Statistical comparisons of classifiers over multiple data sets",
    JMLR 7 (2006); Holm (1979); Efron (1987).

    Examples
    --------
    >>> rng = np.random.default_rng(0); y = rng.integers(0, 2, 400)
    >>> make = lambda acc: np.eye(2)[np.where(rng.random(400) < acc, y, 1 - y)]
    >>> c = compare_predictions({"base": make(0.7), "fused": make(0.9)}, y, n_resamples=500)
    >>> c.candidates[1].difference.ci[0] > 0
    True
    """
    if not predictions:
        raise DataError("predictions: expected at least one candidate, got none")
    spec = get_metric(metric)
    if interval not in INTERVAL_METHODS:
        raise ConfigError(
            f"interval: unknown method {interval!r}; expected one of {', '.join(INTERVAL_METHODS)}"
        )
    if test not in COMPARISON_TESTS:
        raise ConfigError(
            f"test: unknown test {test!r}; expected one of {', '.join(COMPARISON_TESTS)}"
        )
    if test == "mcnemar" and spec.name != "accuracy":
        raise ConfigError(
            f"test: McNemar's test compares accuracies, but metric is {spec.name!r}; "
            "use test='permutation' or metric='accuracy'"
        )
    names = list(predictions)
    if reference is None:
        reference = names[0]
    if reference not in predictions:
        raise ConfigError(
            f"reference: {reference!r} is not a candidate; expected one of {', '.join(names)}"
        )
    arrays: dict[str, np.ndarray] = {}
    y = None
    for name in names:
        p, y = prepare_predictions(
            predictions[name], labels, kind=kind, source=f"predictions {name!r}"
        )
        arrays[name] = p
    first = arrays[names[0]]
    for name in names[1:]:
        if arrays[name].shape != first.shape:
            raise DataError(
                f"predictions {name!r}: shape {arrays[name].shape} differs from "
                f"{names[0]!r} {first.shape}; every candidate must score the same samples "
                "and classes"
            )
    rng = _generator(random_state)
    seeds = rng.integers(0, 2**31 - 1, size=3 * len(names) + 1)
    common = dict(
        metric=spec,
        method=interval,
        confidence_level=confidence_level,
        n_resamples=n_resamples,
        stratify=stratify,
    )
    estimates = {
        name: bootstrap_metric(arrays[name], y, name=name, random_state=int(seeds[i]), **common)
        for i, name in enumerate(names)
    }
    others = [n for n in names if n != reference]
    differences: dict[str, IntervalResult] = {}
    raw: dict[str, TestResult] = {}
    for i, name in enumerate(others):
        pair = (name, reference)
        differences[name] = paired_bootstrap(
            arrays[name],
            arrays[reference],
            y,
            names=pair,
            random_state=int(seeds[len(names) + i]),
            **common,
        )
        if test == "permutation":
            raw[name] = metric_permutation_test(
                arrays[name],
                arrays[reference],
                y,
                metric=spec,
                n_resamples=n_resamples,
                random_state=int(seeds[2 * len(names) + i]),
                names=pair,
            )
        elif test == "mcnemar":
            raw[name] = mcnemar(y, arrays[name], arrays[reference], names=pair)
        else:
            d = differences[name]
            raw[name] = TestResult(
                statistic=d.statistic,
                pvalue=float(d.pvalue),
                method="paired bootstrap test",
                compared=pair,
            )
    adjusted = dict(zip(others, holm([raw[n].pvalue for n in others])))
    rows = []
    for name in names:
        if name == reference:
            rows.append(CandidateComparison(name, estimates[name]))
            continue
        r = raw[name]
        rows.append(
            CandidateComparison(
                name,
                estimates[name],
                differences[name],
                TestResult(
                    statistic=r.statistic,
                    pvalue=float(adjusted[name]),
                    method=f"{r.method}, Holm-adjusted",
                    compared=r.compared,
                    df=r.df,
                ),
                raw_pvalue=r.pvalue,
            )
        )
    friedman = None
    block_scores = np.empty((0, len(names)))
    if len(names) >= 3 and len(y) >= 2 * n_blocks and n_blocks >= 2:
        blocks = _blocks(y, n_blocks, int(seeds[-1]))
        block_scores = np.array(
            [[spec.function(arrays[n][b], y[b]) for n in names] for b in blocks]
        )
        if np.isfinite(block_scores).all():
            friedman = friedman_test(
                block_scores, greater_is_better=spec.greater_is_better, names=names, alpha=alpha
            )
    return Comparison(
        metric=spec.name,
        greater_is_better=spec.greater_is_better,
        reference=reference,
        candidates=tuple(rows),
        friedman=friedman,
        confidence_level=confidence_level,
        n_samples=len(y),
        test=test,
        block_scores=block_scores,
    )
