"""Many candidates on many data sets (or folds): ranks, Friedman, Nemenyi, Holm, Wilcoxon.

``scores`` arrays are shaped (n_blocks, n_candidates): one row per data set
(or per fold, or per disjoint chunk of a test set), one column per candidate.
Rank 1 is the best candidate of a block; tied candidates share the mean rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product
from typing import Literal

import numpy as np
from scipy.stats import chi2, norm, rankdata, studentized_range

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation.paired_tests import _paired_differences, _tail_pvalue
from modelfuse.evaluation.results import FriedmanResult, TestResult

__all__ = [
    "PAIRWISE_TESTS",
    "compare_to_reference",
    "friedman_test",
    "holm",
    "mean_ranks",
    "nemenyi_critical_difference",
    "rank_scores",
    "wilcoxon_signed_rank",
]


def _scores(scores: np.ndarray, *, min_candidates: int = 2) -> np.ndarray:
    x = np.asarray(scores, dtype=float)
    if x.ndim != 2 or x.shape[1] < min_candidates or x.shape[0] < 1:
        raise DataError(
            "scores: expected shape (n_blocks, n_candidates) with at least "
            f"{min_candidates} candidates, got {x.shape}"
        )
    if not np.isfinite(x).all():
        raise DataError("scores: contains NaN or inf")
    return x


def _names(names: Sequence[str] | None, k: int) -> tuple[str, ...]:
    if names is None:
        return tuple(f"model {j}" for j in range(k))
    names = tuple(str(n) for n in names)
    if len(names) != k:
        raise DataError(f"names: {len(names)} names for {k} candidates; expected one per column")
    return names


def rank_scores(scores: np.ndarray, *, greater_is_better: bool = True) -> np.ndarray:
    """Rank the candidates within each block (row); 1 is the best, ties share the mean rank.

    Parameters
    ----------
    scores : array of shape (n_blocks, n_candidates)
    greater_is_better : bool
        True for scores such as accuracy, False for losses.

    Returns
    -------
    numpy.ndarray of shape (n_blocks, n_candidates)

    Examples
    --------
    >>> rank_scores(np.array([[0.9, 0.8, 0.9]])).tolist()
    [[1.5, 3.0, 1.5]]
    """
    x = _scores(scores, min_candidates=1)
    return rankdata(-x if greater_is_better else x, axis=1, method="average")


def mean_ranks(
    scores: np.ndarray,
    *,
    greater_is_better: bool = True,
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Mean rank of each candidate across blocks: rank aggregation across tasks.

    Parameters
    ----------
    scores : array of shape (n_blocks, n_candidates)
    greater_is_better : bool
    names : sequence of str, optional

    Returns
    -------
    dict
        Candidate name to mean rank, best (lowest) first.

    References
    ----------
    Demšar, "Statistical comparisons of classifiers over multiple data sets",
    JMLR 7 (2006) 1-30.

    Examples
    --------
    >>> mean_ranks(np.array([[0.9, 0.8], [0.7, 0.75]]), names=["a", "b"])
    {'a': 1.5, 'b': 1.5}
    """
    ranks = rank_scores(scores, greater_is_better=greater_is_better).mean(axis=0)
    labels = _names(names, ranks.size)
    order = np.argsort(ranks, kind="stable")
    return {labels[j]: float(ranks[j]) for j in order}


def _mean_rank_se(k: int, n: int) -> float:
    """``sqrt(k (k + 1) / (6 N))``: the standard error of a difference of two mean ranks.

    k candidates ranked in N blocks, under the null of equal ranks (Demšar 2006).
    """
    return np.sqrt(k * (k + 1) / (6 * n))


def nemenyi_critical_difference(n_candidates: int, n_blocks: int, alpha: float = 0.05) -> float:
    """Nemenyi's critical difference of mean ranks.

    ``CD = q_alpha sqrt(k (k + 1) / (6 N))`` with ``q_alpha`` the studentized
    range quantile (infinite df) divided by sqrt(2); two candidates whose mean
    ranks differ by more than CD differ significantly at level ``alpha``.

    Parameters
    ----------
    n_candidates : int
        k, at least 2.
    n_blocks : int
        N, the number of data sets (blocks).
    alpha : float

    Returns
    -------
    float

    References
    ----------
    Nemenyi, *Distribution-free multiple comparisons*, PhD thesis, Princeton
    1963; Demšar (2006), section 3.2.2.

    Examples
    --------
    >>> round(nemenyi_critical_difference(4, 10), 3)
    1.483
    """
    if n_candidates < 2 or n_blocks < 1:
        raise ConfigError(
            f"n_candidates, n_blocks: expected k >= 2 and N >= 1, got {n_candidates}, {n_blocks}"
        )
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha: expected a level in (0, 1) such as 0.05, got {alpha!r}")
    q = studentized_range.ppf(1 - alpha, n_candidates, np.inf) / np.sqrt(2)
    return float(q * _mean_rank_se(n_candidates, n_blocks))


def friedman_test(
    scores: np.ndarray,
    *,
    greater_is_better: bool = True,
    names: Sequence[str] | None = None,
    alpha: float = 0.05,
) -> FriedmanResult:
    """Friedman's test that all candidates rank equally, with Nemenyi's critical difference.

    ``chi2_F = (12 / (N k (k + 1)) sum_j R_j^2 - 3 N (k + 1)) / C`` where
    ``R_j`` is candidate j's rank sum and ``C = 1 - sum (t^3 - t) / (N k (k^2
    - 1))`` corrects for tied ranks; chi-square with ``k - 1`` df.

    Parameters
    ----------
    scores : array of shape (n_blocks, n_candidates)
        At least 3 candidates.
    greater_is_better : bool
    names : sequence of str, optional
    alpha : float
        Level of the critical difference.

    Returns
    -------
    FriedmanResult

    References
    ----------
    Friedman, "The use of ranks to avoid the assumption of normality implicit
    in the analysis of variance", JASA 32 (1937); Demšar (2006).

    Examples
    --------
    >>> s = np.array([[0.9, 0.8, 0.7], [0.85, 0.8, 0.6], [0.7, 0.75, 0.6], [0.9, 0.7, 0.65]])
    >>> round(friedman_test(s).statistic, 3)
    6.5
    """
    x = _scores(scores, min_candidates=3)
    n, k = x.shape
    ranks = rank_scores(x, greater_is_better=greater_is_better)
    rank_sums = ranks.sum(axis=0)
    ties = 0.0
    for row in x:
        _, counts = np.unique(row, return_counts=True)
        ties += np.sum(counts**3 - counts)
    correction = 1 - ties / (n * k * (k**2 - 1))
    if correction == 0:
        statistic, pvalue = 0.0, 1.0  # every block ties every candidate
    else:
        statistic = (12 / (n * k * (k + 1)) * np.sum(rank_sums**2) - 3 * n * (k + 1)) / correction
        pvalue = float(chi2.sf(statistic, k - 1))
    return FriedmanResult(
        statistic=float(statistic),
        pvalue=pvalue,
        method="Friedman",
        compared=_names(names, k),
        mean_ranks=tuple(float(r) for r in rank_sums / n),
        critical_difference=nemenyi_critical_difference(k, n, alpha),
        alpha=alpha,
        n_blocks=n,
        df=k - 1,
    )


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of p-values for multiple comparisons.

    Sort the m p-values ascending; the i-th smallest (i from 0) becomes
    ``max_{l <= i} min(1, (m - l) p_(l))``; reject where the adjusted value is
    below the level. Controls the family-wise error rate.

    Parameters
    ----------
    pvalues : sequence of float

    Returns
    -------
    numpy.ndarray
        Adjusted p-values in the input order.

    References
    ----------
    Holm, "A simple sequentially rejective multiple test procedure",
    Scandinavian Journal of Statistics 6 (1979) 65-70.

    Examples
    --------
    >>> holm([0.01, 0.04, 0.03]).round(4).tolist()
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(pvalues, dtype=float).ravel()
    if p.size == 0:
        return p.copy()
    if ((p < 0) | (p > 1) | ~np.isfinite(p)).any():
        raise DataError("pvalues: expected numbers in [0, 1]")
    order = np.argsort(p, kind="stable")
    m = p.size
    stepped = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = stepped
    return out


def _wilcoxon_exact_cdf(n: int) -> np.ndarray:
    """P(W+ <= w) for w = 0 .. n(n+1)/2 with no ties: counts of subsets of {1..n} by sum."""
    top = n * (n + 1) // 2
    counts = np.zeros(top + 1)
    counts[0] = 1.0
    for r in range(1, n + 1):
        counts[r:] = counts[r:] + counts[:-r].copy()
    return np.cumsum(counts) / 2.0**n


def wilcoxon_signed_rank(
    x: np.ndarray,
    y: np.ndarray,
    *,
    alternative: Literal["two-sided", "greater", "less"] = "two-sided",
    zero_method: Literal["wilcox", "pratt"] = "wilcox",
    method: Literal["auto", "exact", "asymptotic"] = "auto",
    correction: bool = False,
    names: tuple[str, str] = ("a", "b"),
) -> TestResult:
    """Wilcoxon's signed-rank test of paired scores, e.g. two models across data sets.

    Ranks the absolute differences ``d = x - y`` (mean ranks for ties);
    ``W+`` sums the ranks of positive differences. ``zero_method="wilcox"``
    drops zero differences; ``"pratt"`` ranks them and then drops their
    ranks. ``method="exact"`` uses the null distribution of ``W+`` (exact
    without ties or zeros); ``"asymptotic"`` the normal approximation with
    tie (and, for Pratt, zero) corrections and an optional continuity
    correction; ``"auto"`` is exact for n <= 50 without ties or zeros, the
    enumeration of all sign patterns for n <= 13 otherwise, and asymptotic
    beyond. The reported statistic is ``min(W+, W-)`` for two-sided tests and
    ``W+`` otherwise. These are the conventions of :func:`scipy.stats.wilcoxon`.

    Parameters
    ----------
    x, y : arrays of shape (n,)
    alternative : {"two-sided", "greater", "less"}
    zero_method : {"wilcox", "pratt"}
    method : {"auto", "exact", "asymptotic"}
    correction : bool
    names : tuple of str

    Returns
    -------
    TestResult

    References
    ----------
    Wilcoxon, "Individual comparisons by ranking methods", Biometrics
    Bulletin 1 (1945) 80-83; Demšar (2006), section 3.1.3.

    Examples
    --------
    >>> r = wilcoxon_signed_rank([0.9, 0.8, 0.85, 0.7, 0.95], [0.8, 0.7, 0.8, 0.72, 0.9])
    >>> r.statistic, round(r.pvalue, 4)
    (1.0, 0.125)
    """
    for option, value, allowed in (
        ("alternative", alternative, ("two-sided", "greater", "less")),
        ("zero_method", zero_method, ("wilcox", "pratt")),
        ("method", method, ("auto", "exact", "asymptotic")),
    ):
        if value not in allowed:
            raise ConfigError(
                f"{option}: unknown value {value!r}; expected one of {', '.join(allowed)}"
            )
    d = _paired_differences(x, y)
    zeros = d == 0
    n_zero = int(zeros.sum())
    kept = d[~zeros] if zero_method == "wilcox" else d
    if kept.size == 0 or not np.any(kept != 0):
        raise DataError("x, y: every difference is zero; the test is undefined")
    ranks = rankdata(np.abs(kept))
    w_plus = float(ranks[kept > 0].sum())
    w_minus = float(ranks[kept < 0].sum())
    _, tie_counts = np.unique(np.abs(kept[kept != 0]), return_counts=True)
    has_ties = bool(np.any(tie_counts > 1)) or (zero_method == "pratt" and n_zero > 1)
    chosen = method
    if method == "auto":
        if d.size <= 50 and not has_ties and n_zero == 0:
            chosen = "exact"
        elif d.size <= 13:
            chosen = "permutation"
        else:
            chosen = "asymptotic"
    if chosen == "exact":
        n = kept.size
        cdf = _wilcoxon_exact_cdf(n)
        low = cdf[min(int(np.ceil(w_plus)), len(cdf) - 1)]
        high = 1.0 - (cdf[int(np.floor(w_plus)) - 1] if np.floor(w_plus) >= 1 else 0.0)
        pvalue = _tail_pvalue(low, high, alternative)
    elif chosen == "permutation":
        signs = np.array(list(product((1.0, -1.0), repeat=kept.size)))
        null = ((signs * np.sign(kept)) > 0) @ ranks
        tol = 1e-9
        high = np.mean(null >= w_plus - tol)
        low = np.mean(null <= w_plus + tol)
        pvalue = _tail_pvalue(low, high, alternative)
    else:
        count = kept.size
        mean = count * (count + 1) / 4
        var = count * (count + 1) * (2 * count + 1)
        nonzero = np.abs(kept[kept != 0])
        _, t = np.unique(nonzero, return_counts=True)
        if zero_method == "pratt":
            mean -= n_zero * (n_zero + 1) / 4
            var -= n_zero * (n_zero + 1) * (2 * n_zero + 1)
        sd = np.sqrt((var - np.sum(t**3 - t) / 2) / 24)
        z = (w_plus - mean) / sd
        if correction:
            sign = {"greater": 1.0, "less": -1.0}.get(alternative, np.sign(z))
            z -= sign * 0.5 / sd
        if alternative == "greater":
            pvalue = norm.sf(z)
        elif alternative == "less":
            pvalue = norm.cdf(z)
        else:
            pvalue = 2 * norm.sf(abs(z))
    statistic = min(w_plus, w_minus) if alternative == "two-sided" else w_plus
    return TestResult(
        statistic=float(statistic),
        pvalue=float(min(1.0, pvalue)),
        method=f"Wilcoxon signed-rank ({chosen})",
        compared=tuple(names),
    )


def _rank_z_test(
    scores: np.ndarray, reference: int, candidate: int, greater_is_better: bool
) -> float:
    n, k = scores.shape
    ranks = rank_scores(scores, greater_is_better=greater_is_better).mean(axis=0)
    z = (ranks[candidate] - ranks[reference]) / _mean_rank_se(k, n)
    return float(z)


PAIRWISE_TESTS: dict[str, str] = {
    "wilcoxon": "Wilcoxon signed-rank test of the paired scores",
    "rank": "z-test of the difference of mean ranks (Demšar 2006, eq. for comparisons "
    "with a control)",
}
"""Tests :func:`compare_to_reference` can run, by name."""


def compare_to_reference(
    scores: np.ndarray,
    reference: str | int,
    *,
    names: Sequence[str] | None = None,
    test: Literal["wilcoxon", "rank"] = "wilcoxon",
    greater_is_better: bool = True,
) -> tuple[TestResult, ...]:
    """Each candidate against a reference, with Holm-adjusted p-values.

    Parameters
    ----------
    scores : array of shape (n_blocks, n_candidates)
    reference : str or int
        The reference's name (or column).
    names : sequence of str, optional
    test : {"wilcoxon", "rank"}
        ``"wilcoxon"``: :func:`wilcoxon_signed_rank` on each pair of columns.
        ``"rank"``: ``z = (R_j - R_ref) / sqrt(k (k + 1) / (6 N))`` on the
        Friedman mean ranks, two-sided normal p-value.
    greater_is_better : bool

    Returns
    -------
    tuple of TestResult
        One per candidate other than the reference, in column order; each
        ``pvalue`` is Holm-adjusted over the ``k - 1`` comparisons.

    References
    ----------
    Demšar (2006), section 3.2.2; Holm (1979).

    Examples
    --------
    >>> s = np.array([[0.9, 0.8, 0.7], [0.85, 0.8, 0.6], [0.7, 0.75, 0.6], [0.9, 0.7, 0.65]])
    >>> [round(r.pvalue, 3) for r in compare_to_reference(s, 0, test="rank")]
    [0.48, 0.027]
    """
    if test not in PAIRWISE_TESTS:
        raise ConfigError(
            f"test: unknown test {test!r}; expected one of {', '.join(PAIRWISE_TESTS)}"
        )
    x = _scores(scores)
    labels = _names(names, x.shape[1])
    if isinstance(reference, str):
        if reference not in labels:
            raise ConfigError(
                f"reference: {reference!r} is not a candidate; expected one of {', '.join(labels)}"
            )
        ref = labels.index(reference)
    else:
        ref = int(reference)
        if not 0 <= ref < x.shape[1]:
            raise ConfigError(f"reference: column {ref} out of range for {x.shape[1]} candidates")
    raw: list[TestResult] = []
    for j in range(x.shape[1]):
        if j == ref:
            continue
        pair = (labels[j], labels[ref])
        if test == "wilcoxon":
            raw.append(wilcoxon_signed_rank(x[:, j], x[:, ref], names=pair))
        else:
            z = _rank_z_test(x, ref, j, greater_is_better)
            raw.append(
                TestResult(
                    statistic=z,
                    pvalue=float(2 * norm.sf(abs(z))),
                    method="mean-rank z-test",
                    compared=pair,
                )
            )
    adjusted = holm([r.pvalue for r in raw])
    return tuple(
        TestResult(
            statistic=r.statistic,
            pvalue=float(p),
            method=f"{r.method}, Holm-adjusted",
            compared=r.compared,
            df=r.df,
        )
        for r, p in zip(raw, adjusted)
    )
