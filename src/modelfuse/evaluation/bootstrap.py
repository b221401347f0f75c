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

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation.intervals import (
    INTERVAL_METHODS,
    Inference,
    bca_interval,
    infer,
    percentile_interval,
)
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
    "group_codes",
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


def _check_resamples(n_resamples: int) -> None:
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 2:
        raise ConfigError(f"n_resamples: expected an integer >= 2, got {n_resamples!r}")


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


def group_codes(groups: np.ndarray | None, n_samples: int) -> np.ndarray | None:
    """Group ids as integer codes ``0 .. G-1`` in order of the sorted ids, checked against ``n_samples``.

    Parameters
    ----------
    groups : array of shape (n_samples,) or None
        Any hashable ids (integers, strings); samples with equal ids form one group.
    n_samples : int

    Returns
    -------
    numpy.ndarray of int or None

    Examples
    --------
    >>> group_codes(np.array(["b", "a", "b"]), 3).tolist()
    [1, 0, 1]
    """
    if groups is None:
        return None
    ids = np.asarray(groups)
    if ids.ndim != 1 or ids.shape[0] != n_samples:
        raise DataError(
            f"groups: expected one group id per sample, shape ({n_samples},), got {ids.shape}"
        )
    if ids.dtype.kind == "f" and not np.isfinite(ids).all():
        raise DataError("groups: contains NaN or inf; expected one finite id per sample")
    _, codes = np.unique(ids, return_inverse=True)
    codes = codes.ravel().astype(np.int64)
    if codes.max(initial=0) + 1 < 2:
        raise DataError(
            f"groups: all {n_samples} samples are in one group; resampling whole groups "
            "needs at least 2 groups (pass groups=None to resample samples)"
        )
    return codes


def _group_matrix(codes: np.ndarray) -> scipy.sparse.csr_matrix:
    """The (G, n) indicator matrix of group membership."""
    n = len(codes)
    return scipy.sparse.csr_matrix(
        (np.ones(n), (codes, np.arange(n))), shape=(int(codes.max()) + 1, n)
    )


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
        groups: np.ndarray | None = None,
    ) -> None:
        self.spec = spec
        self.groups = groups
        self.n_groups = None if groups is None else int(groups.max()) + 1
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
        if self.groups is not None:
            return self._cluster_replicates(n_resamples, rng)
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

    def _group_sums(self) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
        """Per-group sums of the per-sample rows, sparse (G, d), and the group sizes (G,)."""
        members = _group_matrix(self.groups)
        unique, inverse = np.unique(self.keys, axis=0, return_inverse=True)
        per_sample = self.rows(unique)[inverse.ravel()]
        return (members @ per_sample).tocsr(), np.asarray(members.sum(axis=1)).ravel()

    def _cluster_replicates(self, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
        """Resample whole groups with replacement: G draws of a group per resample."""
        n_groups = self.n_groups
        values = np.empty(n_resamples)
        per_resample = n_groups if self.vectorised else max(n_groups, self.n)
        chunk = max(1, _CHUNK_ELEMENTS // per_resample)
        if self.vectorised:
            sums, sizes = self._group_sums()
        for start in range(0, n_resamples, chunk):
            stop = min(n_resamples, start + chunk)
            draws = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=stop - start)
            if self.vectorised:
                resampled = np.asarray(sums.T @ draws.T).T
                values[start:stop] = self.from_sums(resampled, draws @ sizes)
                continue
            weights = draws[:, self.groups]  # (c, n): how often each sample is drawn
            if self.spec.on_weights is not None:
                values[start:stop] = self.on_weight_rows(weights.astype(np.float32))
                continue
            for j, row in enumerate(weights):
                values[start + j] = self.on_indices(np.repeat(np.arange(self.n), row))
        return values

    def jackknife(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.groups is not None:
            return self._group_jackknife(rng)
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

    def _group_jackknife(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Delete one group at a time (random sets of groups beyond the exact limit)."""
        n_groups = self.n_groups
        if self.vectorised:
            sums, sizes = self._group_sums()
            full = np.asarray(sums.sum(axis=0)).ravel()
            values = np.empty(n_groups)
            step = max(1, _CHUNK_ELEMENTS // sums.shape[1])
            for start in range(0, n_groups, step):
                left_out = full[None, :] - sums[start : start + step].toarray()
                values[start : start + step] = self.from_sums(
                    left_out, self.n - sizes[start : start + step]
                )
            return values, np.ones(n_groups)
        if n_groups <= _EXACT_JACKKNIFE_LIMIT:
            deleted = [np.array([g]) for g in range(n_groups)]
        else:
            size = n_groups // _JACKKNIFE_GROUPS
            order = rng.permutation(n_groups)[: size * _JACKKNIFE_GROUPS]
            deleted = list(order.reshape(-1, size))
        values = np.empty(len(deleted))
        for j, gone in enumerate(deleted):
            keep = ~np.isin(self.groups, gone)
            if self.spec.on_weights is not None:
                values[j] = self.on_weight_rows(keep[None, :].astype(np.float32))[0]
            else:
                values[j] = self.on_indices(np.flatnonzero(keep))
        return values, np.ones(len(deleted))


def _run(
    plan: _Plan,
    *,
    method: str,
    confidence_level: float,
    n_resamples: int,
    stratify: bool,
    random_state: RandomState,
) -> tuple[float, Inference, np.ndarray]:
    if method not in INTERVAL_METHODS:
        raise ConfigError(
            f"method: unknown interval method {method!r}; "
            f"expected one of {', '.join(INTERVAL_METHODS)}"
        )
    _check_resamples(n_resamples)
    if not 0 < confidence_level < 1:
        raise ConfigError(
            f"confidence_level: expected a number in (0, 1) such as 0.95, got {confidence_level!r}"
        )
    if plan.n < 2:
        raise DataError(f"labels: the bootstrap needs at least 2 samples, got {plan.n}")
    if stratify and plan.groups is not None:
        raise ConfigError(
            "stratify, groups: resampling within classes and resampling whole groups "
            "cannot be combined; pass one of them"
        )
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
    jackknife = plan.jackknife(rng) if method == "bca" else None
    inference = infer(
        estimate,
        distribution,
        method=method,
        confidence_level=confidence_level,
        jackknife=jackknife,
    )
    return estimate, inference, distribution


def _method_label(inference: Inference, stratify: bool, n_groups: int | None) -> str:
    """What an interval's ``method`` says: the method used, and how samples were resampled."""
    label = INTERVAL_METHODS[inference.kind]
    if stratify:
        label += " (stratified)"
    if n_groups is not None:
        label += f" (cluster, {n_groups} groups)"
    if inference.fallback is not None:
        label += " (BCa unstable)"
    return label


def _result(
    plan: _Plan,
    estimate: float,
    inference: Inference,
    distribution: np.ndarray,
    *,
    label: str,
    compared: tuple[str, ...],
    confidence_level: float,
    n_resamples: int,
    pvalue: float | None = None,
) -> IntervalResult:
    return IntervalResult(
        statistic=estimate,
        ci=inference.interval(confidence_level),
        method=label,
        compared=compared,
        confidence_level=confidence_level,
        n_resamples=int(n_resamples),
        pvalue=pvalue,
        bootstrap_distribution=distribution,
        method_used=inference.kind,
        fallback=inference.fallback,
        bias_correction=inference.bias_correction,
        acceleration=inference.acceleration,
        p_floor=inference.p_floor if pvalue is not None else None,
        n_groups=plan.n_groups,
    )


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
    groups: np.ndarray | None = None,
) -> IntervalResult:
    """A metric of one model with a bootstrap confidence interval.

    BCa is used where it is stable (see :mod:`modelfuse.evaluation.intervals`:
    at least 1000 resamples, a jackknife that varies, a monotone level
    correction, the estimate strictly inside the interval); otherwise the
    percentile interval, and ``result.method_used`` / ``result.fallback`` say so.

    Parameters
    ----------
    probs : array of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    metric : str or MetricSpec
        A key of :data:`modelfuse.evaluation.metrics.METRICS`: ``accuracy``,
        ``balanced_accuracy``, ``macro_f1``, ``auroc``, ``nll``, ``brier``, ``ece``.
    method : {"bca", "percentile"}
        The interval asked for; BCa falls back to percentile where unstable.
    confidence_level : float
    n_resamples : int
        At least :func:`~modelfuse.evaluation.intervals.min_resamples` of the level
        (39 for 95%).
    stratify : bool
        Resample within each class, keeping the class counts of the data
        (needed by AUROC when a class is rare).
    random_state : int or numpy.random.Generator, optional
        Seed; equal seeds give equal intervals.
    kind : {"probabilities", "logits"}
    name : str
        What the result says was measured.
    groups : array of shape (n_samples,), optional
        Group ids: samples that are not independent (views of one image, the
        sentences of one document) share an id. Whole groups are resampled (a
        cluster bootstrap) and the BCa jackknife deletes one group at a time.

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
    plan = _Plan(spec, [p], y, [1.0], groups=group_codes(groups, len(y)))
    estimate, inference, dist = _run(
        plan,
        method=method,
        confidence_level=confidence_level,
        n_resamples=n_resamples,
        stratify=stratify,
        random_state=random_state,
    )
    return _result(
        plan,
        estimate,
        inference,
        dist,
        label=_method_label(inference, stratify, plan.n_groups),
        compared=(spec.name, name),
        confidence_level=confidence_level,
        n_resamples=n_resamples,
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
    groups: np.ndarray | None = None,
) -> IntervalResult:
    """The difference ``metric(a) - metric(b)`` of two models on the same samples, with a CI.

    Both models are scored on the same resampled indices, so the interval
    accounts for the pairing (it is much narrower than the difference of two
    independent intervals when the models agree on most samples).

    The p-value inverts the interval: it is the smallest ``alpha`` at which
    the ``1 - alpha`` interval of the method used (BCa, or percentile where
    BCa is unstable), read off the same resampled differences, excludes 0.
    So ``pvalue <= 1 - confidence_level`` exactly when ``ci`` excludes 0. For
    the percentile interval it is ``2 (min(#d <= 0, #d >= 0) + 1) / (B + 1)``;
    it is never below ``p_floor = 2 / (B + 1)``.

    Parameters
    ----------
    probs_a, probs_b : arrays of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    metric, method, confidence_level, n_resamples, stratify, random_state, kind
        As in :func:`bootstrap_metric`.
    names : tuple of str
        The two models' names.
    groups : array of shape (n_samples,), optional
        Group ids; whole groups are resampled (see :func:`bootstrap_metric`).

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
    plan = _Plan(spec, [pa, pb], y, [1.0, -1.0], groups=group_codes(groups, len(y)))
    estimate, inference, dist = _run(
        plan,
        method=method,
        confidence_level=confidence_level,
        n_resamples=n_resamples,
        stratify=stratify,
        random_state=random_state,
    )
    return _result(
        plan,
        estimate,
        inference,
        dist,
        label="paired " + _method_label(inference, stratify, plan.n_groups),
        compared=(spec.name, f"{names[0]} - {names[1]}"),
        confidence_level=confidence_level,
        n_resamples=n_resamples,
        pvalue=inference.pvalue(),
    )
