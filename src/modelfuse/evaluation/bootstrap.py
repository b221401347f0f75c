"""Bootstrap confidence intervals of metrics, and of differences of two models.

Resampling is vectorised. For metrics that are functions of sums over samples
(accuracy, balanced accuracy, macro F1, NLL, Brier) the resampled sums are
computed for all resamples at once: when the samples take few distinct
values (accuracy: correct or not, per model) the counts of each distinct
value are drawn from one multinomial, which has exactly the distribution of
index resampling; otherwise an (n_resamples, n_samples) index matrix is drawn
in chunks and gathered. AUROC is evaluated for a batch of resamples at once
from rows of per-sample counts (scores sorted once), ECE from rows of indices
through the calibration module's batched ``indices=``. For BCa, the jackknife
is exact and vectorised for the sum metrics; for AUROC and ECE it deletes one
sample at a time up to 1000 samples and equal random groups (200) beyond.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import scipy.sparse
from scipy.special import ndtr, ndtri

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation.metrics import (
    MetricSpec,
    PredictionKind,
    get_metric,
    prepare_predictions,
)
from modelfuse.evaluation.results import IntervalResult

__all__ = [
    "INTERVAL_METHODS",
    "bca_interval",
    "bootstrap_metric",
    "paired_bootstrap",
    "percentile_interval",
    "resample_sums",
]

IntervalMethod = Literal["bca", "percentile"]
RandomState = int | np.random.Generator | None

_CHUNK_ELEMENTS = 1 << 22  # index-matrix entries drawn at once (32 MB of int64)
_BATCH_ELEMENTS = 1 << 18  # resamples x samples per batched metric call: stays in cache
_EXACT_JACKKNIFE_LIMIT = 1000  # above this, metrics without sums use a grouped jackknife
_JACKKNIFE_GROUPS = 200


def _generator(random_state: RandomState) -> np.random.Generator:
    if isinstance(random_state, np.random.Generator):
        return random_state
    return np.random.default_rng(random_state)


def _batch_size(spec: MetricSpec, per_resample: int) -> int:
    """Resamples per batched metric call, each resample holding ``per_resample`` entries.

    Rows of weights (AUROC) are kept small enough to stay in cache; rows of
    indices (ECE) are gathered in chunks like the index matrix.
    """
    size = _BATCH_ELEMENTS if spec.on_weights is not None else _CHUNK_ELEMENTS
    return max(1, size // per_resample)


def _check_level(confidence_level: float) -> None:
    if not 0 < confidence_level < 1:
        raise ConfigError(
            f"confidence_level: expected a number in (0, 1) such as 0.95, got {confidence_level!r}"
        )


def _check_resamples(n_resamples: int) -> None:
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 2:
        raise ConfigError(f"n_resamples: expected an integer >= 2, got {n_resamples!r}")


def percentile_interval(
    distribution: np.ndarray, confidence_level: float = 0.95
) -> tuple[float, float]:
    """The percentile bootstrap interval: the central quantiles of the resampled statistics.

    Parameters
    ----------
    distribution : array of shape (n_resamples,)
        Bootstrap replicates of the statistic.
    confidence_level : float

    Returns
    -------
    (low, high) : tuple of float

    References
    ----------
    Efron and Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13.

    Examples
    --------
    >>> [round(v, 6) for v in percentile_interval(np.arange(101.0), 0.9)]
    [5.0, 95.0]
    """
    _check_level(confidence_level)
    alpha = 1 - confidence_level
    low, high = np.quantile(np.asarray(distribution, dtype=float), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bca_interval(
    estimate: float,
    distribution: np.ndarray,
    jackknife_values: np.ndarray,
    *,
    confidence_level: float = 0.95,
    jackknife_weights: np.ndarray | None = None,
) -> tuple[float, float]:
    """The bias-corrected and accelerated (BCa) bootstrap interval.

    ``z0 = Phi^-1(share of replicates below the estimate)`` (replicates equal
    to it count one half), the acceleration
    ``a = sum(w d^3) / (6 (sum(w d^2))^1.5)`` with ``d = mean(jackknife) -
    jackknife``, and the interval is the pair of quantiles of the replicates
    at ``Phi(z0 + (z0 + z) / (1 - a (z0 + z)))`` for ``z`` the normal
    quantiles of the percentile interval. With ``z0 = 0`` and ``a = 0`` it is
    the percentile interval.

    Parameters
    ----------
    estimate : float
        The statistic on the full sample.
    distribution : array of shape (n_resamples,)
        Bootstrap replicates.
    jackknife_values : array of shape (m,)
        Leave-one-out (or leave-one-group-out) values of the statistic.
    confidence_level : float
    jackknife_weights : array of shape (m,), optional
        How many samples each jackknife value stands for (equal samples share one value).

    Returns
    -------
    (low, high) : tuple of float

    References
    ----------
    Efron, "Better bootstrap confidence intervals", JASA 82 (1987) 171-185.

    Examples
    --------
    >>> d = np.array([-2.0, -1.0, 1.0, 2.0]); jack = np.array([-1.0, 1.0])
    >>> bca_interval(0.0, d, jack, confidence_level=0.5) == percentile_interval(d, 0.5)
    True
    """
    _check_level(confidence_level)
    distribution = np.asarray(distribution, dtype=float)
    jack = np.asarray(jackknife_values, dtype=float)
    weights = np.ones_like(jack) if jackknife_weights is None else np.asarray(jackknife_weights)
    below = np.count_nonzero(distribution < estimate)
    equal = np.count_nonzero(distribution == estimate)
    z0 = ndtri((below + 0.5 * equal) / len(distribution))
    deviations = np.average(jack, weights=weights) - jack
    spread = np.sum(weights * deviations**2)
    acceleration = 0.0 if spread <= 0 else np.sum(weights * deviations**3) / (6 * spread**1.5)
    alpha = 1 - confidence_level
    z = ndtri(np.array([alpha / 2, 1 - alpha / 2]))
    if np.isinf(z0):
        # every replicate lies on one side of the estimate: the interval ends at the extremes
        levels = np.array([0.0, 1.0])
    else:
        levels = ndtr(z0 + (z0 + z) / (1 - acceleration * (z0 + z)))
    low, high = np.quantile(distribution, levels)
    return float(low), float(high)


INTERVAL_METHODS: dict[str, str] = {
    "bca": "bootstrap BCa",
    "percentile": "bootstrap percentile",
}
"""The bootstrap interval methods by name, with the label they print as."""


def _strata_positions(strata: np.ndarray | None, n: int) -> list[np.ndarray]:
    if strata is None:
        return [np.arange(n)]
    order = np.argsort(strata, kind="stable")
    _, starts = np.unique(strata[order], return_index=True)
    return np.split(order, starts[1:])


def _compact(column: np.ndarray) -> np.ndarray:
    """Small integers (0/1 correctness, their differences) as int8: less memory traffic."""
    if np.all((column == np.round(column)) & (np.abs(column) <= 127)):
        return column.astype(np.int8)
    return np.ascontiguousarray(column, dtype=np.float64)


def resample_sums(
    keys: np.ndarray,
    rows: Callable[[np.ndarray], scipy.sparse.spmatrix | np.ndarray],
    n_resamples: int,
    *,
    strata: np.ndarray | None = None,
    random_state: RandomState = None,
    compress: bool = True,
) -> np.ndarray:
    """Sums of per-sample statistics over bootstrap resamples, all resamples at once.

    Sample ``i`` contributes ``rows(keys)[i]`` (a row of ``d`` numbers) to the
    sums. Each resample draws ``n`` samples with replacement (within each
    stratum when ``strata`` is given, keeping stratum sizes fixed).

    Parameters
    ----------
    keys : array of shape (n_samples, q)
        What each sample contributes; equal keys are interchangeable.
    rows : callable
        ``rows(unique_keys) -> (u, d)`` array or sparse matrix of sums per key.
    n_resamples : int
    strata : array of shape (n_samples,), optional
        Resample within each stratum (e.g. the class labels).
    random_state : int or numpy.random.Generator, optional
    compress : bool
        Draw counts of distinct keys from a multinomial when there are few
        of them (exact, and much faster); ``False`` always draws an index matrix.

    Returns
    -------
    numpy.ndarray of shape (n_resamples, d)

    Examples
    --------
    >>> keys = np.array([[0.0], [1.0], [1.0], [1.0]])
    >>> sums = resample_sums(keys, lambda k: k, 1000, random_state=0)
    >>> sums.shape, bool(0 <= sums.min() and sums.max() <= 4)
    ((1000, 1), True)
    """
    _check_resamples(n_resamples)
    rng = _generator(random_state)
    keys = np.asarray(keys)
    if keys.size == 0:
        raise DataError("keys: empty; expected one row per sample")
    if keys.ndim == 1:
        keys = keys[:, None]
    n = keys.shape[0]
    total = np.zeros((n_resamples, 0))
    for positions in _strata_positions(strata, n):
        unique, inverse, counts = np.unique(
            keys[positions], axis=0, return_inverse=True, return_counts=True
        )
        inverse = inverse.ravel()
        table = rows(unique)
        table = scipy.sparse.csr_matrix(table) if not scipy.sparse.issparse(table) else table
        u, d = table.shape
        n_s = len(positions)
        if total.shape[1] != d:
            total = np.zeros((n_resamples, d))
        if compress and u <= max(16, n_s // 8):
            draws = rng.multinomial(n_s, counts / n_s, size=n_resamples)  # (B, u)
            total += np.asarray(table.T @ draws.T).T
            continue
        # few statistics per sample: gather each column through the index matrix;
        # many (balanced accuracy, F1 with many classes): count atoms and multiply
        columns = [_compact(c) for c in table.toarray()[inverse].T] if d <= 8 else None
        index_type = np.int32 if n_s < 2**31 else np.int64
        chunk = max(1, _CHUNK_ELEMENTS // n_s)
        for start in range(0, n_resamples, chunk):
            stop = min(n_resamples, start + chunk)
            index = rng.integers(0, n_s, size=(stop - start, n_s), dtype=index_type)
            if columns is not None:
                for j, column in enumerate(columns):
                    accumulator = np.int64 if column.dtype == np.int8 else np.float64
                    total[start:stop, j] += np.take(column, index).sum(axis=1, dtype=accumulator)
            else:
                atoms = inverse[index] + u * np.arange(stop - start)[:, None]
                draws = np.bincount(atoms.ravel(), minlength=(stop - start) * u)
                draws = draws.reshape(stop - start, u)
                total[start:stop] += np.asarray(table.T @ draws.T).T
    return total


class _Plan:
    """The statistic ``sum_m w_m metric(probs_m)`` and how to resample it."""

    def __init__(
        self,
        spec: MetricSpec,
        probs: Sequence[np.ndarray],
        labels: np.ndarray,
        weights: Sequence[float],
        *,
        collapse: bool = True,
    ) -> None:
        self.spec = spec
        self.probs = list(probs)
        self.labels = labels
        self.weights = list(weights)
        self.sum_weights = list(weights)
        self.n = len(labels)
        self.n_classes = self.probs[0].shape[1]
        self.keys: np.ndarray | None = None
        if spec.keys is not None and spec.rows is not None and spec.from_sums is not None:
            parts = [spec.keys(p, labels) for p in self.probs]
            if all(part is not None for part in parts):
                if collapse and spec.mean_of_keys and len(parts) > 1:
                    # a weighted sum of means is the mean of the weighted per-sample sums
                    parts = [sum(w * part for w, part in zip(self.weights, parts))]
                    self.sum_weights = [1.0]
                self.widths = [part.shape[1] for part in parts]
                self.keys = np.hstack(parts)
                self.dims = [spec.rows(part[:1], self.n_classes).shape[1] for part in parts]

    @property
    def vectorised(self) -> bool:
        return self.keys is not None

    def estimate(self) -> float:
        return float(
            sum(w * self.spec.function(p, self.labels) for w, p in zip(self.weights, self.probs))
        )

    def rows(self, unique: np.ndarray) -> scipy.sparse.csr_matrix:
        blocks, start = [], 0
        for width in self.widths:
            blocks.append(self.spec.rows(unique[:, start : start + width], self.n_classes))
            start += width
        return scipy.sparse.hstack(blocks, format="csr")

    def from_sums(self, sums: np.ndarray, n: int) -> np.ndarray:
        out, start = 0.0, 0
        for w, d in zip(self.sum_weights, self.dims):
            out = out + w * self.spec.from_sums(sums[..., start : start + d], n)
            start += d
        return np.asarray(out, dtype=float)

    def on_indices(self, index: np.ndarray) -> float:
        y = self.labels[index]
        return float(
            sum(w * self.spec.function(p[index], y) for w, p in zip(self.weights, self.probs))
        )

    @property
    def batched(self) -> bool:
        """Whether the metric evaluates many resamples in one call (AUROC, ECE)."""
        return self.spec.on_weights is not None or self.spec.on_rows is not None

    def on_weight_rows(self, weights: np.ndarray) -> np.ndarray:
        return sum(
            w * self.spec.on_weights(p, self.labels, weights)
            for w, p in zip(self.weights, self.probs)
        )

    def on_index_rows(self, rows: np.ndarray) -> np.ndarray:
        if self.spec.on_weights is not None:
            c = rows.shape[0]
            flat = (rows + self.n * np.arange(c)[:, None]).ravel()
            counts = np.bincount(flat, minlength=c * self.n).reshape(c, self.n)
            return self.on_weight_rows(counts.astype(np.float32))  # exact below 2**24
        return sum(
            w * self.spec.on_rows(p, self.labels, rows) for w, p in zip(self.weights, self.probs)
        )

    def replicates(
        self, n_resamples: int, strata: np.ndarray | None, rng: np.random.Generator
    ) -> np.ndarray:
        if self.vectorised:
            sums = resample_sums(self.keys, self.rows, n_resamples, strata=strata, random_state=rng)
            return self.from_sums(sums, self.n)
        groups = _strata_positions(strata, self.n)
        values = np.empty(n_resamples)
        if self.batched:
            chunk = _batch_size(self.spec, self.n)
            for start in range(0, n_resamples, chunk):
                stop = min(n_resamples, start + chunk)
                rows = np.hstack(
                    [g[rng.integers(0, len(g), size=(stop - start, len(g)))] for g in groups]
                )
                values[start:stop] = self.on_index_rows(rows)
            return values
        for b in range(n_resamples):
            index = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
            values[b] = self.on_indices(index)
        return values

    def jackknife(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.vectorised:
            unique, counts = np.unique(self.keys, axis=0, return_counts=True)
            table = self.rows(unique)
            full = np.asarray(table.T @ counts).ravel()
            values = np.empty(len(counts))
            step = max(1, _CHUNK_ELEMENTS // table.shape[1])
            for start in range(0, len(counts), step):
                left_out = full[None, :] - table[start : start + step].toarray()
                values[start : start + step] = self.from_sums(left_out, self.n - 1)
            return values, counts.astype(float)
        if self.n <= _EXACT_JACKKNIFE_LIMIT:
            deleted = np.arange(self.n)[:, None]
        else:
            # delete-a-group jackknife: equal random groups (the n mod G samples left over
            # are never deleted); it estimates the same acceleration with G evaluations
            size = self.n // _JACKKNIFE_GROUPS
            deleted = rng.permutation(self.n)[: size * _JACKKNIFE_GROUPS].reshape(-1, size)
        values = np.empty(len(deleted))
        chunk = _batch_size(self.spec, self.n)
        for start in range(0, len(deleted), chunk):
            part = deleted[start : start + chunk]
            keep = np.ones((len(part), self.n), dtype=bool)
            keep[np.arange(len(part))[:, None], part] = False
            if self.spec.on_weights is not None:
                values[start : start + len(part)] = self.on_weight_rows(keep.astype(np.float32))
            elif self.spec.on_rows is not None:
                rows = np.nonzero(keep)[1].reshape(len(part), -1)
                values[start : start + len(part)] = self.on_index_rows(rows)
            else:
                for j, row in enumerate(keep):
                    values[start + j] = self.on_indices(np.flatnonzero(row))
        return values, np.ones(len(deleted))


def _run(
    plan: _Plan,
    *,
    method: str,
    confidence_level: float,
    n_resamples: int,
    stratify: bool,
    random_state: RandomState,
) -> tuple[float, tuple[float, float], np.ndarray]:
    if method not in INTERVAL_METHODS:
        raise ConfigError(
            f"method: unknown interval method {method!r}; "
            f"expected one of {', '.join(INTERVAL_METHODS)}"
        )
    _check_level(confidence_level)
    _check_resamples(n_resamples)
    if plan.n < 2:
        raise DataError(f"labels: the bootstrap needs at least 2 samples, got {plan.n}")
    rng = _generator(random_state)
    strata = plan.labels if stratify else None
    estimate = plan.estimate()
    distribution = plan.replicates(int(n_resamples), strata, rng)
    bad = ~np.isfinite(distribution)
    if bad.any():
        raise DataError(
            f"metric {plan.spec.name!r} is undefined on {int(bad.sum())} of {n_resamples} "
            "resamples (a class is missing from them); pass stratify=True (CLI: --stratify) "
            "or evaluate on more samples"
        )
    if method == "percentile":
        ci = percentile_interval(distribution, confidence_level)
    else:
        jack, jack_weights = plan.jackknife(rng)
        ci = bca_interval(
            estimate,
            distribution,
            jack,
            confidence_level=confidence_level,
            jackknife_weights=jack_weights,
        )
    return estimate, ci, distribution


def _method_label(method: str, stratify: bool) -> str:
    """What an interval's ``method`` says: the interval method, and whether strata were kept."""
    return INTERVAL_METHODS[method] + (" (stratified)" if stratify else "")


def bootstrap_metric(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    metric: str | MetricSpec = "accuracy",
    method: IntervalMethod = "bca",
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    stratify: bool = False,
    random_state: RandomState = None,
    kind: PredictionKind = "probabilities",
    name: str = "model",
) -> IntervalResult:
    """A metric of one model with a bootstrap confidence interval.

    Parameters
    ----------
    probs : array of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    metric : str or MetricSpec
        A key of :data:`modelfuse.evaluation.metrics.METRICS`: ``accuracy``,
        ``balanced_accuracy``, ``macro_f1``, ``auroc``, ``nll``, ``brier``, ``ece``.
    method : {"bca", "percentile"}
    confidence_level : float
    n_resamples : int
    stratify : bool
        Resample within each class, keeping the class counts of the data
        (needed by AUROC when a class is rare).
    random_state : int or numpy.random.Generator, optional
        Seed; equal seeds give equal intervals.
    kind : {"probabilities", "logits"}
    name : str
        What the result says was measured.

    Returns
    -------
    IntervalResult

    References
    ----------
    Efron, "Better bootstrap confidence intervals", JASA 82 (1987) 171-185.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 200); p = np.where(rng.random(200) < 0.8, y, 1 - y)
    >>> probs = np.eye(2)[p]
    >>> r = bootstrap_metric(probs, y, n_resamples=500, random_state=0)
    >>> r.ci[0] < r.statistic < r.ci[1]
    True
    """
    spec = get_metric(metric)
    p, y = prepare_predictions(probs, labels, kind=kind)
    plan = _Plan(spec, [p], y, [1.0])
    estimate, ci, dist = _run(
        plan,
        method=method,
        confidence_level=confidence_level,
        n_resamples=n_resamples,
        stratify=stratify,
        random_state=random_state,
    )
    label = _method_label(method, stratify)
    return IntervalResult(
        statistic=estimate,
        ci=ci,
        method=label,
        compared=(spec.name, name),
        confidence_level=confidence_level,
        n_resamples=int(n_resamples),
        bootstrap_distribution=dist,
    )


def _prepare_pair(
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    labels: np.ndarray,
    *,
    kind: PredictionKind,
    names: tuple[str, str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two models' checked predictions of the same samples, and the labels; errors name the model."""
    pa, y = prepare_predictions(probs_a, labels, kind=kind, source=f"predictions {names[0]!r}")
    pb, _ = prepare_predictions(probs_b, labels, kind=kind, source=f"predictions {names[1]!r}")
    if pa.shape != pb.shape:
        raise DataError(
            f"predictions {names[0]!r} have shape {pa.shape} but {names[1]!r} have {pb.shape}; "
            "both models must score the same samples and classes"
        )
    return pa, pb, y


def paired_bootstrap(
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    labels: np.ndarray,
    *,
    metric: str | MetricSpec = "accuracy",
    method: IntervalMethod = "bca",
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    stratify: bool = False,
    random_state: RandomState = None,
    kind: PredictionKind = "probabilities",
    names: tuple[str, str] = ("a", "b"),
) -> IntervalResult:
    """The difference ``metric(a) - metric(b)`` of two models on the same samples, with a CI.

    Both models are scored on the same resampled indices, so the interval
    accounts for the pairing (it is much narrower than the difference of two
    independent intervals when the models agree on most samples). The
    p-value is twice the smaller share of resampled differences on either
    side of zero (with the usual +1 correction).

    Parameters
    ----------
    probs_a, probs_b : arrays of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    metric, method, confidence_level, n_resamples, stratify, random_state, kind
        As in :func:`bootstrap_metric`.
    names : tuple of str
        The two models' names.

    Returns
    -------
    IntervalResult

    References
    ----------
    Efron and Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 16.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 500)
    >>> a = np.eye(2)[np.where(rng.random(500) < 0.9, y, 1 - y)]
    >>> b = np.eye(2)[np.where(rng.random(500) < 0.6, y, 1 - y)]
    >>> r = paired_bootstrap(a, b, y, n_resamples=1000, random_state=0)
    >>> r.ci[0] > 0
    True
    """
    spec = get_metric(metric)
    pa, pb, y = _prepare_pair(probs_a, probs_b, labels, kind=kind, names=names)
    plan = _Plan(spec, [pa, pb], y, [1.0, -1.0])
    estimate, ci, dist = _run(
        plan,
        method=method,
        confidence_level=confidence_level,
        n_resamples=n_resamples,
        stratify=stratify,
        random_state=random_state,
    )
    n = len(dist)
    pvalue = min(
        1.0,
        2 * (min(np.count_nonzero(dist <= 0), np.count_nonzero(dist >= 0)) + 1) / (n + 1),
    )
    label = "paired " + _method_label(method, stratify)
    return IntervalResult(
        statistic=estimate,
        ci=ci,
        method=label,
        compared=(spec.name, f"{names[0]} - {names[1]}"),
        confidence_level=confidence_level,
        n_resamples=int(n_resamples),
        pvalue=float(pvalue),
        bootstrap_distribution=dist,
    )
