"""Paired significance tests of two (or several) models scored on the same samples.

McNemar's test (continuity-corrected chi-square, or exact binomial), Cochran's
Q for several models, the corrected resampled t-test of Nadeau and Bengio,
and paired permutation tests (on paired values, and on any metric by
swapping the two models' predictions sample by sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.sparse
from scipy.stats import binom, chi2
from scipy.stats import t as student_t

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation.bootstrap import (
    RandomState,
    _batch_size,
    _check_resamples,
    _generator,
    _group_matrix,
    _Plan,
    _prepare_pair,
    group_codes,
)
from modelfuse.evaluation.metrics import MetricSpec, PredictionKind, get_metric
from modelfuse.evaluation.results import McNemarResult, TestResult

__all__ = [
    "EXACT_SIGN_FLIPS",
    "MCNEMAR_METHODS",
    "cochrans_q",
    "corrected_resampled_ttest",
    "mcnemar",
    "mcnemar_from_counts",
    "metric_permutation_test",
    "paired_permutation_test",
]

Alternative = Literal["two-sided", "greater", "less"]
_ALTERNATIVES = ("two-sided", "greater", "less")

EXACT_SIGN_FLIPS = 2**16
"""Permutation tests enumerate every sign flip (or swap) when there are at most this many."""


def _is_exact(units: int, n_resamples: int) -> bool:
    """Enumerate all ``2^units`` sign patterns when that is at most ``max(EXACT_SIGN_FLIPS, n_resamples)``."""
    return units < 63 and 2**units <= max(EXACT_SIGN_FLIPS, n_resamples)


def _all_signs(units: int) -> np.ndarray:
    """Every pattern of ``units`` swaps, as a (2^units, units) boolean array (row 0: none)."""
    codes = np.arange(2**units, dtype=np.int64)[:, None]
    return ((codes >> np.arange(units)) & 1).astype(bool)


def _floor(units: int, n_resamples: int, exact: bool, alternative: str) -> float:
    """The smallest p-value the test can give."""
    count = 2.0**units if exact else n_resamples + 1
    return min(1.0, (2 if alternative == "two-sided" else 1) / count)

MCNEMAR_METHODS: dict[str, str] = {
    "exact": "McNemar (exact binomial)",
    "corrected": "McNemar (chi2, continuity-corrected)",
    "uncorrected": "McNemar (chi2)",
}
"""McNemar variants by name, with the label they print as."""


def _check_alternative(alternative: str) -> None:
    if alternative not in _ALTERNATIVES:
        raise ConfigError(
            f"alternative: unknown value {alternative!r}; expected one of {', '.join(_ALTERNATIVES)}"
        )


def mcnemar_from_counts(
    b: int,
    c: int,
    *,
    method: Literal["exact", "corrected", "uncorrected"] = "exact",
    names: tuple[str, str] = ("a", "b"),
) -> McNemarResult:
    """McNemar's test from the two discordant counts.

    With ``n = b + c``: ``"corrected"`` is ``chi2 = (|b - c| - 1)^2 / n`` on 1
    df, ``"uncorrected"`` drops the ``- 1``, and ``"exact"`` is
    ``p = min(1, 2 BinomCDF(min(b, c); n, 1/2))`` with statistic ``min(b, c)``.
    With ``n = 0`` the models never disagree and ``p = 1``.

    Parameters
    ----------
    b : int
        Samples the first model gets right and the second wrong.
    c : int
        Samples the first model gets wrong and the second right.
    method : {"exact", "corrected", "uncorrected"}
    names : tuple of str

    Returns
    -------
    McNemarResult

    References
    ----------
    McNemar, "Note on the sampling error of the difference between correlated
    proportions or percentages", Psychometrika 12 (1947) 153-157.

    Examples
    --------
    >>> round(mcnemar_from_counts(10, 3, method="corrected").statistic, 4)
    2.7692
    """
    if method not in MCNEMAR_METHODS:
        raise ConfigError(
            f"method: unknown McNemar method {method!r}; "
            f"expected one of {', '.join(MCNEMAR_METHODS)}"
        )
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise DataError(f"McNemar counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if method == "exact":
        statistic = float(min(b, c))
        pvalue = 1.0 if n == 0 else min(1.0, 2 * float(binom.cdf(min(b, c), n, 0.5)))
        df = None
    else:
        shift = 1 if method == "corrected" else 0
        statistic = 0.0 if n == 0 else max(abs(b - c) - shift, 0) ** 2 / n
        pvalue = 1.0 if n == 0 else float(chi2.sf(statistic, 1))
        df = 1
    return McNemarResult(
        statistic=float(statistic),
        pvalue=float(pvalue),
        method=MCNEMAR_METHODS[method],
        compared=tuple(names),
        df=df,
        b=b,
        c=c,
    )


def _correct(predictions: np.ndarray, labels: np.ndarray, source: str) -> np.ndarray:
    array = np.asarray(predictions)
    if array.ndim == 2:
        array = array.argmax(axis=1)
    if array.shape != labels.shape:
        raise DataError(
            f"{source}: {array.shape[0] if array.ndim else 0} predictions for "
            f"{labels.shape[0]} labels; expected one prediction per label"
        )
    return array == labels


def mcnemar(
    labels: np.ndarray,
    predictions_a: np.ndarray,
    predictions_b: np.ndarray,
    *,
    method: Literal["exact", "corrected", "uncorrected"] = "exact",
    names: tuple[str, str] = ("a", "b"),
) -> McNemarResult:
    """McNemar's test of equal accuracy of two classifiers on the same samples.

    Parameters
    ----------
    labels : array of shape (n_samples,)
    predictions_a, predictions_b : arrays of shape (n_samples,) or (n_samples, n_classes)
        Predicted classes, or scores whose ``argmax`` is the predicted class.
    method : {"exact", "corrected", "uncorrected"}
        See :func:`mcnemar_from_counts`.
    names : tuple of str

    Returns
    -------
    McNemarResult

    References
    ----------
    Dietterich, "Approximate statistical tests for comparing supervised
    classification learning algorithms", Neural Computation 10 (1998).

    Examples
    --------
    >>> y = np.array([0, 1, 1, 0, 1]); a = np.array([0, 1, 1, 0, 0]); b = np.array([1, 0, 1, 0, 0])
    >>> r = mcnemar(y, a, b); (r.b, r.c, r.pvalue)
    (2, 0, 0.5)
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise DataError(f"labels: expected shape (n_samples,), got {y.shape}")
    ca = _correct(predictions_a, y, f"predictions {names[0]!r}")
    cb = _correct(predictions_b, y, f"predictions {names[1]!r}")
    return mcnemar_from_counts(
        int(np.sum(ca & ~cb)), int(np.sum(~ca & cb)), method=method, names=names
    )


def cochrans_q(correct: np.ndarray, *, names: Sequence[str] | None = None) -> TestResult:
    """Cochran's Q test that several classifiers have equal accuracy.

    ``Q = (k - 1) (k sum_j C_j^2 - T^2) / (k T - sum_i R_i^2)`` where ``C_j``
    counts the samples model ``j`` gets right, ``R_i`` the models that get
    sample ``i`` right and ``T`` the total; chi-square with ``k - 1`` df.
    For two models it equals McNemar's uncorrected statistic.

    Parameters
    ----------
    correct : array of shape (n_samples, n_models)
        True where a model classifies a sample correctly.
    names : sequence of str, optional

    Returns
    -------
    TestResult

    References
    ----------
    Cochran, "The comparison of percentages in matched samples", Biometrika
    37 (1950) 256-266.

    Examples
    --------
    >>> c = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 0]])
    >>> cochrans_q(c).statistic
    3.5
    """
    x = np.asarray(correct)
    if x.ndim != 2 or x.shape[1] < 2:
        raise DataError(
            f"correct: expected shape (n_samples, n_models) with at least 2 models, got {x.shape}"
        )
    if not np.isin(x, (0, 1)).all():
        raise DataError("correct: expected booleans or 0/1 (1 = the model is right)")
    x = x.astype(float)
    k = x.shape[1]
    columns = x.sum(axis=0)
    rows = x.sum(axis=1)
    total = columns.sum()
    denominator = k * total - np.sum(rows**2)
    q = 0.0 if denominator == 0 else (k - 1) * (k * np.sum(columns**2) - total**2) / denominator
    names = tuple(names) if names is not None else tuple(f"model {j}" for j in range(k))
    return TestResult(
        statistic=float(q),
        pvalue=float(chi2.sf(q, k - 1)) if denominator else 1.0,
        method="Cochran's Q",
        compared=names,
        df=k - 1,
    )


def corrected_resampled_ttest(
    differences: np.ndarray,
    *,
    n_train: int,
    n_test: int,
    alternative: Alternative = "two-sided",
    names: tuple[str, str] = ("a", "b"),
) -> TestResult:
    """The corrected resampled t-test of Nadeau and Bengio.

    For ``J`` score differences from train/test splits (random splits or
    repeated k-fold), ``t = mean / sqrt((1/J + n_test/n_train) s^2)`` with
    ``s^2`` the sample variance (ddof 1); Student t with ``J - 1`` df. The
    ``n_test/n_train`` term corrects the variance for the overlap of the
    training sets, which makes the plain paired t-test far too liberal.

    Parameters
    ----------
    differences : array of shape (J,)
        Score of model a minus score of model b on each split.
    n_train, n_test : int
        Training and test set sizes of one split.
    alternative : {"two-sided", "greater", "less"}
    names : tuple of str

    Returns
    -------
    TestResult

    References
    ----------
    Nadeau and Bengio, "Inference for the generalization error", Machine
    Learning 52 (2003) 239-281.

    Examples
    --------
    >>> r = corrected_resampled_ttest(np.array([0.02, 0.01, 0.03, 0.02]), n_train=90, n_test=10)
    >>> round(r.statistic, 3)
    4.076
    """
    _check_alternative(alternative)
    d = np.asarray(differences, dtype=float).ravel()
    if d.size < 2 or not np.isfinite(d).all():
        raise DataError(f"differences: expected at least 2 finite values, got {d.size}")
    if n_train < 1 or n_test < 1:
        raise ConfigError(f"n_train, n_test: expected positive sizes, got {n_train}, {n_test}")
    j = d.size
    variance = d.var(ddof=1) * (1 / j + n_test / n_train)
    mean = d.mean()
    if variance == 0:
        t = 0.0 if mean == 0 else np.copysign(np.inf, mean)
    else:
        t = mean / np.sqrt(variance)
    pvalue = _t_pvalue(t, j - 1, alternative)
    return TestResult(
        statistic=float(t),
        pvalue=pvalue,
        method="corrected resampled t-test (Nadeau-Bengio)",
        compared=tuple(names),
        df=j - 1,
    )


def _t_pvalue(t: float, df: float, alternative: str) -> float:
    if alternative == "greater":
        return float(student_t.sf(t, df))
    if alternative == "less":
        return float(student_t.cdf(t, df))
    return float(min(1.0, 2 * student_t.sf(abs(t), df)))


def _tail_pvalue(less: float, greater: float, alternative: str) -> float:
    """The p-value from the two tail probabilities; two-sided doubles the smaller one."""
    if alternative == "greater":
        return float(greater)
    if alternative == "less":
        return float(less)
    return float(min(1.0, 2 * min(greater, less)))


def _permutation_pvalue(
    observed: float, null: np.ndarray, alternative: str, *, exact: bool
) -> float:
    tolerance = 1e-12 * max(1.0, abs(observed))
    adjust = 0 if exact else 1
    greater = (np.count_nonzero(null >= observed - tolerance) + adjust) / (len(null) + adjust)
    less = (np.count_nonzero(null <= observed + tolerance) + adjust) / (len(null) + adjust)
    return _tail_pvalue(less, greater, alternative)


def _paired_differences(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x - y`` of two non-empty 1-d arrays of paired values of equal length."""
    a = np.asarray(x, dtype=float).ravel()
    b = np.asarray(y, dtype=float).ravel()
    if a.shape != b.shape or a.size == 0:
        raise DataError(
            f"x, y: expected two non-empty arrays of equal length, got {a.size} and {b.size}"
        )
    return a - b


def paired_permutation_test(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_resamples: int = 9999,
    alternative: Alternative = "two-sided",
    random_state: RandomState = None,
    names: tuple[str, str] = ("a", "b"),
    groups: np.ndarray | None = None,
) -> TestResult:
    """Paired permutation (sign-flip) test of the mean difference of paired values.

    Under the null each pair is exchangeable, so the sign of each difference
    ``x_i - y_i`` is flipped at random. All ``2^n`` sign patterns are
    enumerated when ``2^n <= max(EXACT_SIGN_FLIPS, n_resamples)`` (an exact
    p-value, the share of patterns at least as extreme); otherwise
    ``n_resamples`` random patterns are drawn and the p-value is
    ``(1 + #as extreme) / (1 + n_resamples)``. Two-sided p-values double the
    smaller tail, as :func:`scipy.stats.permutation_test` does. With
    ``groups`` the differences of one group share one sign (whole groups are
    flipped), which keeps the level when samples within a group are
    correlated; ``n`` is then the number of groups.

    Parameters
    ----------
    x, y : arrays of shape (n,)
        Paired values (per-sample losses, per-fold scores, per-data-set scores).
    n_resamples : int
    alternative : {"two-sided", "greater", "less"}
        ``"greater"``: the mean of ``x - y`` is greater than 0.
    random_state : int or numpy.random.Generator, optional
    names : tuple of str
    groups : array of shape (n,), optional
        Group ids; pairs with equal ids are flipped together.

    Returns
    -------
    TestResult
        ``statistic`` is the mean difference; ``p_floor`` the smallest
        p-value the test can give (``2 / 2^n`` exact, ``2 / (n_resamples + 1)``
        drawn, two-sided).

    References
    ----------
    Good, *Permutation, Parametric, and Bootstrap Tests of Hypotheses*, 3rd
    ed., Springer 2005, ch. 3.

    Examples
    --------
    >>> r = paired_permutation_test([3.0, 4.0, 5.0], [1.0, 2.0, 2.0])
    >>> r.pvalue, r.p_floor
    (0.25, 0.25)
    """
    _check_alternative(alternative)
    _check_resamples(n_resamples)
    d = _paired_differences(x, y)
    n = d.size
    observed = float(d.mean())
    codes = group_codes(groups, n)
    units = d if codes is None else np.bincount(codes, weights=d)
    exact = _is_exact(units.size, n_resamples)
    if exact:
        signs = 1.0 - 2.0 * _all_signs(units.size)
        null = signs @ units / n
    else:
        rng = _generator(random_state)
        null = np.empty(n_resamples)
        chunk = max(1, (1 << 22) // units.size)
        for start in range(0, n_resamples, chunk):
            stop = min(n_resamples, start + chunk)
            signs = rng.integers(0, 2, size=(stop - start, units.size)) * 2.0 - 1.0
            null[start:stop] = signs @ units / n
    method = "paired permutation test" + (" (exact)" if exact else "")
    if codes is not None:
        method += f" (whole groups, {units.size})"
    return TestResult(
        statistic=observed,
        pvalue=_permutation_pvalue(observed, null, alternative, exact=exact),
        method=method,
        compared=tuple(names),
        p_floor=_floor(units.size, n_resamples, exact, alternative),
    )


def metric_permutation_test(
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    labels: np.ndarray,
    *,
    metric: str | MetricSpec = "accuracy",
    n_resamples: int = 9999,
    alternative: Alternative = "two-sided",
    random_state: RandomState = None,
    kind: PredictionKind = "probabilities",
    names: tuple[str, str] = ("a", "b"),
    groups: np.ndarray | None = None,
) -> TestResult:
    """Paired permutation test of ``metric(a) - metric(b)`` for any metric.

    Under the null the two models' predictions of each sample are
    exchangeable, so each resample swaps them on a random half of the
    samples and recomputes the difference. With ``groups`` a swap moves a
    whole group's predictions (the sign-flip test over groups). With at most
    16 samples (or groups), or ``2^n <= n_resamples``, every swap pattern is
    enumerated and the p-value is exact. For metrics that are functions of
    sums (accuracy, balanced accuracy, macro F1, NLL, Brier) the swaps are
    drawn as binomial counts per distinct sample (or group) and all
    resamples are computed at once; for AUROC and ECE both models'
    predictions are stacked and each batch of resamples picks one of the two
    per sample.

    Parameters
    ----------
    probs_a, probs_b : arrays of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    metric : str or MetricSpec
    n_resamples : int
    alternative : {"two-sided", "greater", "less"}
        ``"greater"``: ``metric(a) > metric(b)``.
    random_state : int or numpy.random.Generator, optional
    kind : {"probabilities", "logits"}
    names : tuple of str
    groups : array of shape (n_samples,), optional
        Group ids; the samples of one group are swapped together.

    Returns
    -------
    TestResult
        ``statistic`` is the observed difference; ``p = (1 + #as extreme) /
        (1 + n_resamples)`` (exact: the share of patterns as extreme);
        ``p_floor`` is the smallest p-value the test can give.

    References
    ----------
    Dietterich, "Approximate statistical tests for comparing supervised
    classification learning algorithms", Neural Computation 10 (1998).

    Examples
    --------
    >>> rng = np.random.default_rng(0); y = rng.integers(0, 2, 300)
    >>> a = np.eye(2)[np.where(rng.random(300) < 0.9, y, 1 - y)]
    >>> b = np.eye(2)[np.where(rng.random(300) < 0.6, y, 1 - y)]
    >>> metric_permutation_test(a, b, y, n_resamples=999, random_state=0).pvalue < 0.01
    True
    """
    _check_alternative(alternative)
    _check_resamples(n_resamples)
    spec = get_metric(metric)
    pa, pb, y = _prepare_pair(probs_a, probs_b, labels, kind=kind, names=names)
    codes = group_codes(groups, len(y))
    rng = _generator(random_state)
    plan = _Plan(spec, [pa, pb], y, [1.0, -1.0], collapse=False)
    observed = plan.estimate()
    units = len(y) if codes is None else int(codes.max()) + 1
    exact = _is_exact(units, n_resamples)
    if plan.vectorised:
        rows_a, rows_b, counts = _unit_rows(plan, codes, compress=not exact)
        if exact:
            delta = (rows_b - rows_a).toarray()
            moved = _all_signs(units).astype(float) @ delta
            total_a = np.asarray(rows_a.sum(axis=0)).ravel()
            total_b = np.asarray(rows_b.sum(axis=0)).ravel()
            null = _sums_difference(plan, total_a, total_b, moved)
        else:
            null = _swapped_sums_null(plan, rows_a, rows_b, counts, n_resamples, rng)
    else:
        null = _swapped_samples_null(spec, pa, pb, y, codes, units, exact, n_resamples, rng)
    method = f"paired permutation test ({spec.name})" + (" (exact)" if exact else "")
    if codes is not None:
        method += f" (whole groups, {units})"
    return TestResult(
        statistic=observed,
        pvalue=_permutation_pvalue(observed, null, alternative, exact=exact),
        method=method,
        compared=tuple(names),
        p_floor=_floor(units, n_resamples, exact, alternative),
    )


def _unit_rows(
    plan: _Plan, codes: np.ndarray | None, *, compress: bool
) -> tuple[scipy.sparse.csr_matrix, scipy.sparse.csr_matrix, np.ndarray]:
    """Each model's sum rows per unit (sample, or group with ``codes``), and units per row.

    With ``compress`` (and no groups) samples with equal keys share one row and
    ``counts`` says how many they are; otherwise one row per unit and counts of 1.
    """
    width = plan.widths[0]
    if codes is None and compress:
        unique, counts = np.unique(plan.keys, axis=0, return_counts=True)
        rows_a = plan.spec.rows(unique[:, :width], plan.n_classes)
        rows_b = plan.spec.rows(unique[:, width:], plan.n_classes)
        return scipy.sparse.csr_matrix(rows_a), scipy.sparse.csr_matrix(rows_b), counts
    unique, inverse = np.unique(plan.keys, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    rows_a = scipy.sparse.csr_matrix(plan.spec.rows(unique[:, :width], plan.n_classes))[inverse]
    rows_b = scipy.sparse.csr_matrix(plan.spec.rows(unique[:, width:], plan.n_classes))[inverse]
    if codes is not None:
        members = _group_matrix(codes)
        rows_a, rows_b = members @ rows_a, members @ rows_b
    return rows_a.tocsr(), rows_b.tocsr(), np.ones(rows_a.shape[0], dtype=np.int64)


def _sums_difference(
    plan: _Plan, total_a: np.ndarray, total_b: np.ndarray, moved: np.ndarray
) -> np.ndarray:
    """``metric(a) - metric(b)`` after ``moved`` (rows of sums) went from a's sums to b's."""
    return plan.spec.from_sums(total_a + moved, plan.n) - plan.spec.from_sums(
        total_b - moved, plan.n
    )


def _swapped_samples_null(
    spec: MetricSpec,
    pa: np.ndarray,
    pb: np.ndarray,
    y: np.ndarray,
    codes: np.ndarray | None,
    units: int,
    exact: bool,
    n_resamples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Null differences for metrics evaluated on whole predictions: both models stacked."""
    n = len(y)
    stacked = _Plan(spec, [np.concatenate([pa, pb])], np.concatenate([y, y]), [1.0])
    base = np.arange(n)
    total = 2**units if exact else n_resamples
    null = np.empty(total)
    chunk = _batch_size(spec, 2 * n)
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        if exact:
            swap = _all_signs(units)[start:stop]
        else:
            swap = rng.random((stop - start, units)) < 0.5
        if codes is not None:
            swap = swap[:, codes]
        rows_a = base + n * swap  # sample i of model a, or of model b where swapped
        rows_b = base + n * ~swap
        if stacked.batched:
            null[start:stop] = stacked.on_index_rows(rows_a) - stacked.on_index_rows(rows_b)
            continue
        for j in range(stop - start):
            null[start + j] = stacked.on_indices(rows_a[j]) - stacked.on_indices(rows_b[j])
    return null


def _swapped_sums_null(
    plan: _Plan,
    rows_a: scipy.sparse.csr_matrix,
    rows_b: scipy.sparse.csr_matrix,
    counts: np.ndarray,
    n_resamples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Null differences when each unit's two predictions are swapped with probability 1/2.

    ``counts[j]`` interchangeable units share row ``j``: how many of them are swapped is
    binomial.
    """
    total_a = np.asarray(rows_a.T @ counts).ravel()
    total_b = np.asarray(rows_b.T @ counts).ravel()
    delta = (rows_b - rows_a).tocsr()  # what one swap moves from a's sums to b's
    null = np.empty(n_resamples)
    chunk = max(1, (1 << 22) // len(counts))
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        swapped = rng.binomial(counts, 0.5, size=(stop - start, len(counts))).astype(float)
        moved = np.asarray(delta.T @ swapped.T).T
        null[start:stop] = _sums_difference(plan, total_a, total_b, moved)
    return null
