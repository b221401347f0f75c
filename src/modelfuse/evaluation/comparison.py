"""Compare several models' predictions on one labelled set: the core of ``modelfuse compare``.

Each distinct model gets its metric with a bootstrap interval, its paired
difference to a reference with a paired-bootstrap interval, and a paired
test against the reference whose p-values are Holm-adjusted over the
distinct models. Candidates with identical predictions are one model (one
row, all its names), counted once in the family. With the default bootstrap
test the difference's interval and p-value come from the same resampled
differences, and a Holm-consistent interval (read off the same replicates at
the level of the candidate's Holm step) excludes 0 exactly when the
Holm-adjusted p-value is at most ``alpha``. The number of resamples behind
the tests is chosen so that the smallest achievable Holm-adjusted p-value is
at most ``alpha / 10``. With three or more distinct models the samples are
also cut into disjoint (stratified, or whole-group) blocks and the models
ranked per block for a Friedman test and Nemenyi's critical difference.
"""

from __future__ import annotations

import math
import warnings
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
    group_codes,
    paired_bootstrap,
)
from modelfuse.evaluation.intervals import interval_at_level
from modelfuse.evaluation.metrics import PredictionKind, get_metric, prepare_predictions
from modelfuse.evaluation.paired_tests import mcnemar, metric_permutation_test
from modelfuse.evaluation.ranking import friedman_test, holm
from modelfuse.evaluation.results import FriedmanResult, IntervalResult, TestResult

__all__ = [
    "COMPARISON_TESTS",
    "CandidateComparison",
    "Comparison",
    "choose_reference",
    "compare_predictions",
    "resamples_for_family",
]

COMPARISON_TESTS: dict[str, str] = {
    "bootstrap": "the paired bootstrap p-value of the metric difference, the inversion of its "
    "interval (any metric)",
    "permutation": "paired permutation test of the metric difference (any metric)",
    "mcnemar": "exact McNemar test (accuracy only)",
}
"""Tests of each candidate against the reference, by name."""

FLOOR_MARGIN = 10
"""Resamples are chosen so that the smallest Holm-adjusted p-value is at most ``alpha / FLOOR_MARGIN``."""


def _fmt_p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


@dataclass(frozen=True)
class CandidateComparison:
    """One candidate's line of a comparison.

    Attributes
    ----------
    name : str
    estimate : IntervalResult
        The metric with its interval.
    difference : IntervalResult or None
        ``metric(candidate) - metric(reference)`` with its paired interval at
        the comparison's ``confidence_level``, unadjusted for the other
        comparisons; ``None`` for the reference. A candidate identical to the
        reference has the exact difference 0 (interval ``(0, 0)``, p = 1),
        outside the Holm family.
    test : TestResult or None
        The test against the reference; ``pvalue`` is Holm-adjusted over the
        distinct models, ``raw_pvalue`` keeps the unadjusted one.
    raw_pvalue : float or None
    same_as : tuple of str
        The other candidates whose predictions are identical to this one's.
    adjusted_difference : IntervalResult or None
        With ``test="bootstrap"``: the Holm-consistent interval of the
        difference, read off the same replicates as ``difference`` at level
        ``1 - alpha / k`` where ``k`` is the Holm multiplier of the
        candidate's step (for a candidate Holm does not reject, the
        multiplier of the step where Holm stopped). It excludes 0 exactly
        when ``test.pvalue <= alpha``. It is not a simultaneous confidence
        set (Bonferroni's ``1 - alpha / m`` intervals would be). ``None``
        for other tests, whose verdict is ``significant``.
    significant : bool or None
        The Holm-adjusted verdict: ``test.pvalue <= alpha``.
    """

    name: str
    estimate: IntervalResult
    difference: IntervalResult | None = None
    test: TestResult | None = None
    raw_pvalue: float | None = None
    same_as: tuple[str, ...] = ()
    adjusted_difference: IntervalResult | None = None
    significant: bool | None = None

    @property
    def label(self) -> str:
        """The row's name: all names of one model, e.g. ``"wise_ft = base"``."""
        return " = ".join((self.name, *self.same_as))

    def __str__(self) -> str:
        parts = [f"{self.label}: {self.estimate}"]
        if self.difference is not None:
            parts.append(str(self.difference))
        if self.adjusted_difference is not None:
            low, high = self.adjusted_difference.ci
            parts.append(
                f"Holm-consistent {self.adjusted_difference.confidence_level:.4g} CI "
                f"[{low:.4g}, {high:.4g}]"
            )
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
        One per input name, in input order; the reference is among them.
        Candidates with identical predictions share their results (see
        ``same_as``); :attr:`models` keeps one row per distinct model.
    friedman : FriedmanResult or None
        Over disjoint blocks of the samples, for three or more distinct models.
    block_scores : numpy.ndarray
        The (n_blocks, n_models) metric values the Friedman test ranked, one
        column per distinct model (:attr:`models`).
    confidence_level : float
    n_samples : int
    test : str
        The test against the reference (a key of :data:`COMPARISON_TESTS`).
    alpha : float
        The family-wise level of the Holm verdicts and Holm-consistent intervals.
    family_size : int
        The number of distinct models compared with the reference.
    n_test_resamples : int or None
        Resamples (or permutations) behind each test's p-value.
    p_floor : float or None
        The smallest Holm-adjusted p-value the tests can give:
        ``family_size`` times the smallest raw p-value.
    intervals : {"holm-consistent", "unadjusted"}
        Whether ``adjusted_difference`` intervals exist (bootstrap test) or
        only the unadjusted ``difference`` intervals beside the Holm verdict.
    leader : tuple of str
        The distinct model(s) with the best metric on these samples (ties share).
    reference_rule : str
        How the reference was chosen.
    notes : tuple of str
        Sentences for a reader: duplicates, the p-value floor when it
        matters, BCa fall-backs, unadjusted intervals, and the leader (chosen
        on the samples it is scored on) with whether its edge is significant.
    n_groups : int or None
        With ``groups=``, the number of groups resampled and flipped whole.
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
    alpha: float = 0.05
    family_size: int = 0
    n_test_resamples: int | None = None
    p_floor: float | None = None
    intervals: str = "unadjusted"
    leader: tuple[str, ...] = ()
    reference_rule: str = "the first candidate"
    notes: tuple[str, ...] = ()
    n_groups: int | None = None

    @property
    def models(self) -> tuple[CandidateComparison, ...]:
        """One row per distinct model (the first of its names that is not a copy), input order."""
        seen: set[str] = set()
        rows = []
        for c in self.candidates:
            if c.name in seen:
                continue
            seen.update((c.name, *c.same_as))
            rows.append(c)
        return tuple(rows)

    def candidate(self, name: str) -> CandidateComparison:
        """The row of ``name`` (any of a model's names)."""
        for c in self.candidates:
            if c.name == name:
                return c
        raise ConfigError(
            f"name: {name[:60]!r} is not a candidate; expected one of "
            f"{', '.join(c.name for c in self.candidates)}"
        )

    def __str__(self) -> str:
        head = (
            f"{self.metric} of {len(self.models)} distinct model(s) on {self.n_samples} samples, "
            f"reference {self.reference}"
        )
        lines = [head, *(f"  {c}" for c in self.models)]
        if self.friedman is not None:
            lines.append(f"  {self.friedman}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def choose_reference(
    scores: Mapping[str, float],
    *,
    tie_breaker: Mapping[str, float] | None = None,
    greater_is_better: bool = True,
) -> str:
    """The candidate with the best score; ties broken by the lower ``tie_breaker``, then order.

    The rule, stated once: the best ``scores`` value (e.g. validation
    accuracy) wins; among candidates with exactly equal scores, the one with
    the lowest ``tie_breaker`` value (e.g. validation NLL) wins; among those
    still tied, the first in the mapping's order.

    Parameters
    ----------
    scores : mapping of str to float
    tie_breaker : mapping of str to float, optional
        Lower is better; every tied candidate must have a value.
    greater_is_better : bool
        Of ``scores``.

    Returns
    -------
    str

    Examples
    --------
    >>> choose_reference({"a": 0.9, "b": 0.92, "c": 0.92}, tie_breaker={"b": 0.31, "c": 0.28})
    'c'
    """
    if not scores:
        raise DataError("scores: expected at least one candidate's score, got none")
    values = {name: float(v) for name, v in scores.items()}
    if not all(math.isfinite(v) for v in values.values()):
        raise DataError("scores: every score must be a finite number")
    best = max(values.values()) if greater_is_better else min(values.values())
    tied = [name for name, v in values.items() if v == best]
    if len(tied) > 1 and tie_breaker is not None:
        missing = [name for name in tied if name not in tie_breaker]
        if missing:
            raise DataError(
                f"tie_breaker: no value for {', '.join(n[:40] for n in missing[:5])}; "
                "expected one for every candidate tied on the score"
            )
        lowest = min(float(tie_breaker[name]) for name in tied)
        tied = [name for name in tied if float(tie_breaker[name]) == lowest]
    return tied[0]


def resamples_for_family(family_size: int, alpha: float = 0.05, *, minimum: int = 0) -> int:
    """Resamples ``B`` whose smallest Holm-adjusted two-sided p-value is at most ``alpha / 10``.

    The smallest p-value of ``B`` resamples is ``2 / (B + 1)``, and Holm
    multiplies the smallest one by the family size ``m``; so
    ``B = ceil(2 m FLOOR_MARGIN / alpha) - 1`` (at least ``minimum``).

    Examples
    --------
    >>> resamples_for_family(17), resamples_for_family(1, minimum=2000)
    (6799, 2000)
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha: expected a level in (0, 1) such as 0.05, got {alpha!r}")
    needed = int(math.ceil(2 * max(1, family_size) * FLOOR_MARGIN / alpha)) - 1
    return max(int(minimum), needed)


def _blocks(
    labels: np.ndarray, n_blocks: int, seed: int, codes: np.ndarray | None = None
) -> list[np.ndarray]:
    from sklearn.model_selection import KFold, StratifiedKFold

    if codes is not None:  # whole groups: each group's samples stay in one block
        block_of_group = np.random.default_rng(seed).permutation(int(codes.max()) + 1) % n_blocks
        block = block_of_group[codes]
        return [np.flatnonzero(block == b) for b in range(n_blocks)]
    counts = np.bincount(labels)
    if counts[counts > 0].min() >= n_blocks:
        splitter = StratifiedKFold(n_splits=n_blocks, shuffle=True, random_state=seed)
        return [test for _, test in splitter.split(np.zeros(len(labels)), labels)]
    splitter = KFold(n_splits=n_blocks, shuffle=True, random_state=seed)
    return [test for _, test in splitter.split(np.zeros(len(labels)))]


def _identical_groups(arrays: dict[str, np.ndarray], reference: str) -> dict[str, list[str]]:
    """Representative name -> all names with exactly equal predictions (the reference represents its own)."""
    groups: dict[str, list[str]] = {}
    for name, array in arrays.items():
        for head, members in groups.items():
            if arrays[head].shape == array.shape and np.array_equal(arrays[head], array):
                members.append(name)
                break
        else:
            groups[name] = [name]
    out = {}
    for members in groups.values():
        head = reference if reference in members else members[0]
        out[head] = [head, *(m for m in members if m != head)]
    return out


def _holm_levels(raw: list[float], alpha: float) -> list[float]:
    """Holm-consistent levels ``1 - alpha / k``: ``k`` is the Holm multiplier of each step,
    and for hypotheses after the first that Holm keeps, the multiplier where it stopped."""
    m = len(raw)
    order = np.argsort(raw, kind="stable")
    multipliers = np.empty(m)
    stopped = None
    for step, index in enumerate(order):
        k = m - step
        if stopped is None and k * raw[index] > alpha:
            stopped = k
        multipliers[index] = k if stopped is None else stopped
    return [1 - alpha / k for k in multipliers]


def _describe_leader(
    rows: list[CandidateComparison],
    reference: str,
    metric: str,
    greater_is_better: bool,
    alpha: float,
    n_samples: int,
) -> tuple[tuple[str, ...], str]:
    values = [r.estimate.statistic for r in rows]
    best = max(values) if greater_is_better else min(values)
    leaders = [r for r, v in zip(rows, values) if v == best]
    names = tuple(r.name for r in leaders)
    word = "highest" if greater_is_better else "lowest"
    shown = " and ".join(r.label for r in leaders)
    head = (
        f"{word} {metric} on these {n_samples} samples: {shown} ({best:.4f}); "
        f"{'they were' if len(leaders) > 1 else 'it was'} picked on the samples "
        f"{'they are' if len(leaders) > 1 else 'it is'} scored on"
    )
    if len(rows) == 1:
        return names, head
    if any(r.difference is None for r in leaders):
        worse = sum(1 for r in rows if r.significant)
        return names, (
            f"{head}, and {reference} is the reference: {worse} of {len(rows) - 1} other "
            f"model(s) differ from it significantly (Holm, alpha {alpha:g})"
        )
    clauses = []
    for r in leaders:
        p = r.test.pvalue if r.test is not None else 1.0
        if r.significant:
            clauses.append(
                f"the edge of {r.label} over the reference {reference} is significant "
                f"(Holm-adjusted p = {_fmt_p(p)} <= {alpha:g})"
            )
        else:
            clauses.append(
                f"the edge of {r.label} over the reference {reference} is not significant "
                f"(Holm-adjusted p = {_fmt_p(p)} > {alpha:g}): these samples do not show it "
                f"is better than {reference}"
            )
    return names, f"{head}; " + "; ".join(clauses)


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
    test: Literal["bootstrap", "permutation", "mcnemar"] = "bootstrap",
    stratify: bool = False,
    n_blocks: int = 10,
    alpha: float = 0.05,
    random_state: RandomState = 0,
    groups: np.ndarray | None = None,
    n_permutations: int | None = None,
    reference_scores: Mapping[str, float] | None = None,
    reference_tie_breaker: Mapping[str, float] | None = None,
) -> Comparison:
    """Compare candidates' predictions of the same samples against a reference.

    Parameters
    ----------
    predictions : mapping of str to array of shape (n_samples, n_classes)
        Candidate name to its probabilities (or logits with ``kind="logits"``).
        Candidates whose predictions are exactly equal are one model: they
        share one row (``same_as``) and count once in the Holm family.
    labels : array of shape (n_samples,)
    reference : str, optional
        The candidate the others are compared with. Default: the one
        :func:`choose_reference` picks from ``reference_scores`` when given,
        otherwise the first.
    metric : str
        A key of :data:`modelfuse.evaluation.metrics.METRICS`.
    kind : {"probabilities", "logits"}
    confidence_level : float
        Of the metric intervals and the unadjusted difference intervals.
    n_resamples : int
        Bootstrap resamples of the metric intervals (and at least this many
        behind the tests).
    interval : {"bca", "percentile"}
        BCa falls back to percentile where unstable (the results say so).
    test : {"bootstrap", "permutation", "mcnemar"}
        The paired test against the reference; p-values are Holm-adjusted.
        ``"bootstrap"`` (default) takes the p-value from the same resampled
        differences as the interval (their inversion), and gives
        Holm-consistent intervals (``adjusted_difference``). The other tests
        give a Holm verdict beside unadjusted intervals (``intervals =
        "unadjusted"``), and a note says so.
    stratify : bool
        Stratified bootstrap resampling.
    n_blocks : int
        Disjoint blocks of samples (stratified when every class has at least
        ``n_blocks`` samples; whole groups with ``groups``) for the Friedman
        test and critical difference. Needs three or more distinct models;
        skipped (``friedman=None``) with fewer than ``2 n_blocks`` samples (or
        fewer groups than blocks) or when the metric is undefined on a block.
    alpha : float
        Family-wise level of the Holm verdicts and Holm-consistent intervals,
        and of Nemenyi's critical difference.
    random_state : int or numpy.random.Generator
        Seeds everything; equal seeds give equal comparisons.
    groups : array of shape (n_samples,), optional
        Group ids of samples that are not independent (e.g. views of one
        image): intervals resample whole groups, permutation tests swap whole
        groups, Friedman blocks keep groups whole. Not with ``mcnemar``.
    n_permutations : int, optional
        Resamples behind each test's p-value (permutations, or the paired
        bootstrap's resamples for ``test="bootstrap"``). Default:
        :func:`resamples_for_family` of the family size, so that the smallest
        achievable Holm-adjusted p-value is at most ``alpha / 10`` (never
        fewer than ``n_resamples``). A count that cannot reach ``alpha``
        warns; one that cannot reach ``alpha / 10`` gets a note.
    reference_scores, reference_tie_breaker : mapping of str to float, optional
        Choose the reference when ``reference`` is None: the highest score
        (e.g. validation accuracy), ties broken by the lowest tie-breaker
        (e.g. validation NLL), then input order (:func:`choose_reference`).

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
    >>> c.candidates[1].difference.ci[0] > 0, c.candidates[1].significant
    (True, True)
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
            "use test='bootstrap' or metric='accuracy'"
        )
    if test == "mcnemar" and groups is not None:
        raise ConfigError(
            "test: McNemar's test treats samples as independent, but groups were given; "
            "use test='bootstrap' or test='permutation'"
        )
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha: expected a level in (0, 1) such as 0.05, got {alpha!r}")
    if n_permutations is not None and (
        not isinstance(n_permutations, (int, np.integer)) or n_permutations < 2
    ):
        raise ConfigError(f"n_permutations: expected an integer >= 2, got {n_permutations!r}")
    names = list(predictions)
    rule = "the first candidate"
    if reference is None and reference_scores is not None:
        unknown = [n for n in reference_scores if n not in predictions]
        if unknown:
            raise ConfigError(
                f"reference_scores: {unknown[0][:60]!r} is not a candidate; expected names "
                f"among {', '.join(n[:40] for n in names)}"
            )
        reference = choose_reference(reference_scores, tie_breaker=reference_tie_breaker)
        rule = (
            "the highest reference score"
            + (", ties broken by the lowest tie-breaker" if reference_tie_breaker else "")
            + ", then input order"
        )
    elif reference is not None:
        rule = "given"
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
    codes = group_codes(groups, len(y))
    n_groups = None if codes is None else int(codes.max()) + 1
    identical = _identical_groups(arrays, reference)
    heads = [n for n in names if n in identical]  # distinct models, input order
    others = [n for n in heads if n != reference]
    m = len(others)
    n_tests = (
        resamples_for_family(m, alpha, minimum=n_resamples)
        if n_permutations is None
        else int(n_permutations)
    )
    rng = _generator(random_state)
    seeds = rng.integers(0, 2**31 - 1, size=3 * len(names) + 1)
    position = {name: i for i, name in enumerate(names)}
    common = dict(
        metric=spec,
        method=interval,
        confidence_level=confidence_level,
        stratify=stratify,
        groups=groups,
    )
    estimates = {
        name: bootstrap_metric(
            arrays[name],
            y,
            name=name,
            n_resamples=n_resamples,
            random_state=int(seeds[position[name]]),
            **common,
        )
        for name in heads
    }
    differences: dict[str, IntervalResult] = {}
    raw: dict[str, TestResult] = {}
    for name in others:
        pair = (name, reference)
        k = position[name]
        differences[name] = paired_bootstrap(
            arrays[name],
            arrays[reference],
            y,
            names=pair,
            n_resamples=n_tests if test == "bootstrap" else n_resamples,
            random_state=int(seeds[len(names) + k]),
            **common,
        )
        if test == "permutation":
            raw[name] = metric_permutation_test(
                arrays[name],
                arrays[reference],
                y,
                metric=spec,
                n_resamples=n_tests,
                random_state=int(seeds[2 * len(names) + k]),
                names=pair,
                groups=groups,
            )
        elif test == "mcnemar":
            raw[name] = mcnemar(y, arrays[name], arrays[reference], names=pair)
        else:
            d = differences[name]
            raw[name] = TestResult(
                statistic=d.statistic,
                pvalue=float(d.pvalue),
                method=f"paired bootstrap test ({INTERVAL_METHODS[d.method_used]} inversion)",
                compared=pair,
                p_floor=d.p_floor,
            )
    raw_p = [raw[n].pvalue for n in others]
    adjusted = dict(zip(others, holm(raw_p)))
    levels = dict(zip(others, _holm_levels(raw_p, alpha))) if others else {}
    rows_by_head: dict[str, CandidateComparison] = {}
    for name in heads:
        if name == reference:
            rows_by_head[name] = CandidateComparison(name, estimates[name])
            continue
        r = raw[name]
        adjusted_interval = None
        if test == "bootstrap":
            adjusted_interval = interval_at_level(differences[name], levels[name])
        rows_by_head[name] = CandidateComparison(
            name,
            estimates[name],
            differences[name],
            TestResult(
                statistic=r.statistic,
                pvalue=float(adjusted[name]),
                method=f"{r.method}, Holm-adjusted over {m}",
                compared=r.compared,
                df=r.df,
                p_floor=None if r.p_floor is None else min(1.0, m * r.p_floor),
            ),
            raw_pvalue=r.pvalue,
            adjusted_difference=adjusted_interval,
            significant=bool(adjusted[name] <= alpha),
        )
    rows = []
    for name in names:
        head = next(h for h, members in identical.items() if name in members)
        shared = rows_by_head[head]
        copies = tuple(n for n in identical[head] if n != name)
        if head == reference and name != reference:
            rows.append(_copy_of_reference(name, reference, shared.estimate, copies, test))
            continue
        rows.append(
            CandidateComparison(
                name,
                shared.estimate,
                shared.difference,
                shared.test,
                shared.raw_pvalue,
                same_as=copies,
                adjusted_difference=shared.adjusted_difference,
                significant=shared.significant,
            )
        )
    floors = [raw[n].p_floor for n in others if raw[n].p_floor is not None]
    p_floor = min(1.0, m * max(floors)) if floors else None
    notes = _notes(
        rows_by_head=rows_by_head,
        identical=identical,
        reference=reference,
        test=test,
        m=m,
        p_floor=p_floor,
        n_tests=n_tests,
        alpha=alpha,
        confidence_level=confidence_level,
    )
    head_rows = [rows[position[h]] for h in heads]
    leader, leader_note = _describe_leader(
        head_rows, reference, spec.name, spec.greater_is_better, alpha, len(y)
    )
    notes.append(leader_note)
    friedman = None
    labels_of = [rows[position[h]].label for h in heads]
    block_scores = np.empty((0, len(heads)))
    enough = len(y) >= 2 * n_blocks if codes is None else n_groups >= n_blocks
    if len(heads) >= 3 and enough and n_blocks >= 2:
        blocks = _blocks(y, n_blocks, int(seeds[-1]), codes)
        block_scores = np.array(
            [[spec.function(arrays[n][b], y[b]) for n in heads] for b in blocks]
        )
        if np.isfinite(block_scores).all():
            friedman = friedman_test(
                block_scores,
                greater_is_better=spec.greater_is_better,
                names=labels_of,
                alpha=alpha,
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
        alpha=alpha,
        family_size=m,
        n_test_resamples=None if test == "mcnemar" else n_tests,
        p_floor=p_floor,
        intervals="holm-consistent" if test == "bootstrap" else "unadjusted",
        leader=leader,
        reference_rule=rule,
        notes=tuple(notes),
        n_groups=n_groups,
    )


def _copy_of_reference(
    name: str, reference: str, estimate: IntervalResult, copies: tuple[str, ...], test: str
) -> CandidateComparison:
    """A candidate identical to the reference: its difference is exactly 0, untested (p = 1)."""
    zero = IntervalResult(
        statistic=0.0,
        ci=(0.0, 0.0),
        method="identical predictions",
        compared=(estimate.compared[0], f"{name} - {reference}"),
        confidence_level=estimate.confidence_level,
        pvalue=1.0,
    )
    return CandidateComparison(
        name,
        estimate,
        zero,
        TestResult(
            statistic=0.0,
            pvalue=1.0,
            method="identical predictions to the reference (outside the Holm family)",
            compared=(name, reference),
        ),
        raw_pvalue=1.0,
        same_as=copies,
        adjusted_difference=zero if test == "bootstrap" else None,
        significant=False,
    )


def _notes(
    *,
    rows_by_head: dict[str, CandidateComparison],
    identical: dict[str, list[str]],
    reference: str,
    test: str,
    m: int,
    p_floor: float | None,
    n_tests: int,
    alpha: float,
    confidence_level: float,
) -> list[str]:
    notes = []
    for head, members in identical.items():
        if len(members) > 1:
            what = "the reference" if head == reference else "one model"
            notes.append(
                f"{' = '.join(members)}: identical predictions, reported as {what} "
                "(one row) and counted once among the comparisons"
            )
    if p_floor is not None and m and p_floor > alpha / FLOOR_MARGIN:
        floor = (
            f"the smallest Holm-adjusted p-value {n_tests} resamples can give over {m} "
            f"comparison(s) is {_fmt_p(p_floor)}"
        )
        if p_floor > alpha:
            message = (
                f"{floor}, above alpha {alpha:g}: no candidate can be found significant; "
                f"pass n_permutations >= {resamples_for_family(m, alpha)}"
            )
            warnings.warn(message, UserWarning, stacklevel=3)
            notes.append(message)
        else:
            notes.append(f"{floor} (alpha {alpha:g})")
    unstable: dict[str, list[str]] = {}
    for row in rows_by_head.values():
        for result in (row.estimate, row.difference):
            if result is not None and result.fallback is not None:
                what = row.label if result is row.estimate else f"{row.label} - {reference}"
                reason = result.fallback.split(": ", 1)[-1]
                unstable.setdefault(reason, []).append(what)
    for reason, items in unstable.items():
        notes.append(f"percentile intervals instead of BCa for {', '.join(items)}: {reason}")
    if test != "bootstrap" and m:
        notes.append(
            f"the {confidence_level:.0%} intervals of the differences are unadjusted paired "
            f"bootstrap intervals; significance is the Holm-adjusted {test} test at alpha "
            f"{alpha:g}, which can disagree with them near the boundary"
        )
    return notes
