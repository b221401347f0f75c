"""Calibration metrics on arrays of probabilities: ECE and its variants, Brier, NLL.

Every function takes ``probs`` of shape (n_samples, n_classes) (rows summing to
one) and integer ``labels`` of shape (n_samples,), and returns a Python float.
All are vectorised (one pass of ``numpy.bincount`` or one sort, no Python loop
over samples or bins).

For bootstrap loops every function also takes ``indices``: an integer array of
shape (n_resamples, m) whose rows are resamples of sample indices (rows of
``numpy.random.Generator.integers(0, n, (n_resamples, n))`` for example). The
function then returns one value per row, an array of shape (n_resamples,),
equal to calling it on ``probs[row], labels[row]`` row by row, but computed in
vectorised chunks (uniform bins are assigned once, on the whole data).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from modelfuse.arrays import check_labels, check_predictions
from modelfuse.errors import ConfigError, DataError
from modelfuse.limits import MAX_BINS

__all__ = [
    "MAX_BINS",
    "adaptive_calibration_error",
    "bin_index",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
]

Binning = Literal["uniform", "quantile"]
Norm = Literal["l1", "l2", "max"]

_BINNINGS = ("uniform", "quantile")
_NORMS = ("l1", "l2", "max")
# Upper bound on the elements gathered at once when ``indices`` is given.
_CHUNK_ELEMENTS = 1 << 22


def _checked(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = check_predictions(probs, "probabilities", source="probs")
    if p.ndim != 2:
        raise DataError(f"probs: expected shape (n_samples, n_classes), got {p.shape}")
    y = check_labels(labels, n_samples=p.shape[0], n_classes=p.shape[1], source="labels")
    return p, y


def _checked_indices(indices: np.ndarray | None, n_samples: int) -> np.ndarray | None:
    if indices is None:
        return None
    idx = np.asarray(indices)
    if idx.ndim != 2 or idx.shape[1] == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise DataError(
            f"indices: expected integer resample indices of shape (n_resamples, m) with m >= 1, "
            f"got dtype {idx.dtype} and shape {idx.shape}"
        )
    if idx.size and (idx.min() < 0 or idx.max() >= n_samples):
        raise DataError(
            f"indices: values must lie in [0, {n_samples}), got [{idx.min()}, {idx.max()}]"
        )
    return idx


def _check_options(n_bins: int, binning: str, norm: str) -> None:
    if (
        isinstance(n_bins, bool)
        or not isinstance(n_bins, (int, np.integer))
        or not 1 <= n_bins <= MAX_BINS
    ):
        raise ConfigError(
            f"n_bins: expected an integer in [1, {MAX_BINS}], got {str(n_bins)[:40]!r}"
        )
    if binning not in _BINNINGS:
        raise ConfigError(f"binning: expected one of {', '.join(_BINNINGS)}, got {binning!r}")
    if norm not in _NORMS:
        raise ConfigError(f"norm: expected one of {', '.join(_NORMS)}, got {norm!r}")


def _row_chunks(indices: np.ndarray, per_row: int):
    rows = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    for start in range(0, indices.shape[0], rows):
        yield indices[start : start + rows]


def bin_index(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of the bin ``(edges[b], edges[b + 1]]`` holding each value.

    Values at or below ``edges[0]`` go into the first bin and values above
    ``edges[-1]`` into the last.

    Examples
    --------
    >>> import numpy as np
    >>> bin_index(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.5, 0.51, 1.0]))
    array([0, 0, 1, 1])
    """
    ids = np.searchsorted(edges, values, side="left") - 1
    return np.clip(ids, 0, len(edges) - 2).astype(np.intp, copy=False)


def _uniform_bin_ids(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each confidence for equal-width bins (lower, upper] over [0, 1]."""
    return bin_index(np.linspace(0.0, 1.0, n_bins + 1), conf)


def _bin_sums_uniform(
    ids: np.ndarray, conf: np.ndarray, hit: np.ndarray, n_bins: int, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin count, sum of confidence and sum of hits, shape (R, J, n_bins).

    ``ids``, ``conf`` and ``hit`` have shape (n, J) (J columns scored
    separately); ``rows`` (R, m) resample them, or None for the data as it is.
    """
    n_cols = ids.shape[1]
    if rows is None:
        ids, conf, hit = ids[None], conf[None], hit[None]
    else:
        ids, conf, hit = ids[rows], conf[rows], hit[rows]
    r = ids.shape[0]
    offset = (np.arange(r)[:, None, None] * n_cols + np.arange(n_cols)[None, None, :]) * n_bins
    keys = (ids + offset).ravel()
    size = r * n_cols * n_bins
    count = np.bincount(keys, minlength=size)
    sconf = np.bincount(keys, weights=conf.ravel(), minlength=size)
    shit = np.bincount(keys, weights=hit.ravel(), minlength=size)
    shape = (r, n_cols, n_bins)
    return count.reshape(shape), sconf.reshape(shape), shit.reshape(shape)


def _bin_sums_quantile(
    conf: np.ndarray, hit: np.ndarray, n_bins: int, rows: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-mass bins: sort each column by confidence and cut it into ``n_bins`` runs.

    The runs have the sizes of ``numpy.array_split`` (the first ``m % n_bins``
    hold one more sample); ties are ordered by a stable sort.
    """
    if rows is None:
        conf, hit = conf[None], hit[None]
    else:
        conf, hit = conf[rows], hit[rows]
    m = conf.shape[1]
    order = np.argsort(conf, axis=1, kind="stable")
    conf = np.take_along_axis(conf, order, axis=1)
    hit = np.take_along_axis(hit, order, axis=1)
    sizes = np.full(n_bins, m // n_bins)
    sizes[: m % n_bins] += 1
    ends = np.cumsum(sizes)
    zeros = np.zeros(conf.shape[:1] + (1,) + conf.shape[2:])
    cconf = np.concatenate([zeros, np.cumsum(conf, axis=1, dtype=np.float64)], axis=1)
    chit = np.concatenate([zeros, np.cumsum(hit, axis=1, dtype=np.float64)], axis=1)
    sconf = np.diff(cconf[:, np.concatenate([[0], ends])], axis=1)
    shit = np.diff(chit[:, np.concatenate([[0], ends])], axis=1)
    count = np.broadcast_to(sizes[None, :, None], sconf.shape)
    # to (R, J, n_bins)
    return count.transpose(0, 2, 1), sconf.transpose(0, 2, 1), shit.transpose(0, 2, 1)


def _reduce(count: np.ndarray, sconf: np.ndarray, shit: np.ndarray, norm: str) -> np.ndarray:
    """Calibration error per (resample, column) from per-bin sums, shape (R, J)."""
    n = count.sum(axis=-1)
    diff = np.abs(shit - sconf)
    if norm == "l1":
        return diff.sum(axis=-1) / n
    nonempty = count > 0
    safe = np.where(nonempty, count, 1)
    gap = np.where(nonempty, diff / safe, 0.0)
    if norm == "l2":
        return np.sqrt((gap * diff).sum(axis=-1) / n)
    return gap.max(axis=-1)


def _scored_columns(p: np.ndarray, y: np.ndarray, classwise: bool) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, hit) columns: top-label (n, 1) or one per class (n, K)."""
    if classwise:
        hit = np.zeros(p.shape, dtype=np.float32)
        hit[np.arange(p.shape[0]), y] = 1.0
        return p, hit
    pred = p.argmax(axis=1)
    conf = np.take_along_axis(p, pred[:, None], axis=1)
    return conf, (pred == y)[:, None].astype(np.float32)


def expected_calibration_error(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    n_bins: int = 15,
    binning: Binning = "uniform",
    norm: Norm = "l1",
    classwise: bool = False,
    indices: np.ndarray | None = None,
) -> float | np.ndarray:
    """Expected calibration error: the binned gap between confidence and accuracy.

    Top-label by default: each sample's confidence is its largest probability
    ``max_c p_c`` and it counts as a hit when that class (the first one on
    ties, as ``argmax``) is the label. Samples are grouped into bins by
    confidence and, with ``n_b`` samples in bin ``b`` out of ``n``::

        l1  (ECE):  sum_b (n_b / n) |acc_b - conf_b|
        l2:         sqrt(sum_b (n_b / n) (acc_b - conf_b)^2)
        max (MCE):  max over non-empty bins of |acc_b - conf_b|

    Parameters
    ----------
    probs : array of shape (n_samples, n_classes)
        Probabilities; rows sum to one. For a binary classifier give both
        columns ``(1 - p, p)``.
    labels : array of shape (n_samples,)
        Integer labels in ``[0, n_classes)``.
    n_bins : int, default 15
        15 equal-width bins match Guo et al. (2017) and torchmetrics'
        default; netcal and torch-uncertainty default to 10.
    binning : {"uniform", "quantile"}, default "uniform"
        ``"uniform"``: equal-width bins ``(lower, upper]`` over [0, 1] (a
        confidence of exactly 0 goes into the first bin). This is the
        interval of Guo et al.'s reference code; torchmetrics'
        ``torch.bucketize(..., right=True)`` uses ``[lower, upper)`` instead,
        so the two differ only when a confidence lies exactly on an edge.
        ``"quantile"``: equal-mass bins (adaptive calibration error, ACE):
        the samples are sorted by confidence (stable sort) and cut into
        ``n_bins`` runs whose sizes differ by at most one, the larger first
        (``numpy.array_split``). Equal confidences may then fall into two
        neighbouring bins.
    norm : {"l1", "l2", "max"}, default "l1"
        As above; ``"l2"`` is the root of the weighted mean square, as in
        torchmetrics (without its optional debiasing).
    classwise : bool, default False
        Score every class ``c`` separately (confidence ``p_c``, hit
        ``label == c``, all samples) and average the K errors: the classwise
        ECE of Kull et al. (2019). With ``binning="quantile"`` this is the
        ACE of Nixon et al. (2019), except that bins are weighted by their
        share ``n_b / n`` (equal up to rounding) rather than uniformly.
    indices : array of shape (n_resamples, m), optional
        Rows of sample indices (bootstrap resamples). Uniform bins are
        assigned once; quantile bins are recomputed for every row.

    Returns
    -------
    float, or array of shape (n_resamples,) when ``indices`` is given.

    Raises
    ------
    DataError
        Malformed probabilities, labels or indices.
    ConfigError
        An unknown ``binning`` or ``norm``, or ``n_bins`` outside ``[1, MAX_BINS]``
        (``MAX_BINS = 10000``).

    References
    ----------
    Naeini, Cooper, Hauskrecht. Obtaining well calibrated probabilities using
    Bayesian binning. AAAI 2015.
    Guo, Pleiss, Sun, Weinberger. On calibration of modern neural networks.
    ICML 2017.
    Kull et al. Beyond temperature scaling: obtaining well-calibrated
    multiclass probabilities with Dirichlet calibration. NeurIPS 2019.
    Nixon et al. Measuring calibration in deep learning. CVPR Workshops 2019.

    Examples
    --------
    >>> import numpy as np
    >>> probs = np.array([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])
    >>> labels = np.array([1, 0, 0])
    >>> round(expected_calibration_error(probs, labels, n_bins=2), 4)
    0.1
    """
    _check_options(n_bins, binning, norm)
    p, y = _checked(probs, labels)
    rows = _checked_indices(indices, p.shape[0])
    conf, hit = _scored_columns(p, y, classwise)
    if binning == "uniform":
        ids = _uniform_bin_ids(conf, n_bins)

        def sums(r: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return _bin_sums_uniform(ids, conf, hit, n_bins, r)
    else:

        def sums(r: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return _bin_sums_quantile(conf, hit, n_bins, r)

    if rows is None:
        return float(_reduce(*sums(None), norm).mean())
    per_row = rows.shape[1] * conf.shape[1]
    parts = [_reduce(*sums(chunk), norm).mean(axis=1) for chunk in _row_chunks(rows, per_row)]
    return np.concatenate(parts)


def maximum_calibration_error(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    n_bins: int = 15,
    indices: np.ndarray | None = None,
) -> float | np.ndarray:
    """Maximum calibration error: the largest gap over non-empty equal-width bins.

    ``expected_calibration_error(probs, labels, n_bins=n_bins, norm="max")``;
    see there for the parameters.

    References
    ----------
    Naeini, Cooper, Hauskrecht. Obtaining well calibrated probabilities using
    Bayesian binning. AAAI 2015.

    Examples
    --------
    >>> import numpy as np
    >>> probs = np.array([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])
    >>> round(maximum_calibration_error(probs, np.array([1, 0, 0]), n_bins=2), 4)
    0.1
    """
    return expected_calibration_error(probs, labels, n_bins=n_bins, norm="max", indices=indices)


def adaptive_calibration_error(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    n_bins: int = 15,
    indices: np.ndarray | None = None,
) -> float | np.ndarray:
    """Adaptive calibration error: top-label ECE over equal-mass bins.

    ``expected_calibration_error(probs, labels, n_bins=n_bins,
    binning="quantile")``; see there for the parameters and how ties are cut.
    Nixon et al. define ACE classwise; pass ``classwise=True`` to
    :func:`expected_calibration_error` for that.

    References
    ----------
    Nixon et al. Measuring calibration in deep learning. CVPR Workshops 2019.

    Examples
    --------
    >>> import numpy as np
    >>> probs = np.array([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])
    >>> round(adaptive_calibration_error(probs, np.array([1, 0, 0]), n_bins=3), 4)
    0.3
    """
    return expected_calibration_error(
        probs, labels, n_bins=n_bins, binning="quantile", indices=indices
    )


def calibration_bins(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    n_bins: int = 15,
    binning: Binning = "uniform",
) -> dict[str, np.ndarray]:
    """Per-bin statistics of the top-label confidence (what a reliability diagram draws).

    Parameters
    ----------
    probs, labels, n_bins, binning
        As in :func:`expected_calibration_error`.

    Returns
    -------
    dict of arrays of shape (n_bins,)
        ``lower`` and ``upper`` (bin edges; for quantile bins the smallest and
        largest confidence inside, NaN when empty), ``count``, ``confidence``
        (mean confidence, NaN when empty) and ``accuracy`` (NaN when empty).

    Examples
    --------
    >>> import numpy as np
    >>> probs = np.array([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1]])
    >>> calibration_bins(probs, np.array([1, 0, 0]), n_bins=2)["count"]
    array([0, 3])
    """
    _check_options(n_bins, binning, "l1")
    p, y = _checked(probs, labels)
    conf, hit = _scored_columns(p, y, classwise=False)
    if binning == "uniform":
        count, sconf, shit = _bin_sums_uniform(
            _uniform_bin_ids(conf, n_bins), conf, hit, n_bins, None
        )
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        lower, upper = edges[:-1], edges[1:]
    else:
        count, sconf, shit = _bin_sums_quantile(conf, hit, n_bins, None)
        ordered = np.sort(conf[:, 0])
        ends = np.cumsum(count[0, 0])
        starts = ends - count[0, 0]
        nonempty = count[0, 0] > 0
        lower = np.where(nonempty, ordered[np.minimum(starts, len(ordered) - 1)], np.nan)
        upper = np.where(nonempty, ordered[np.maximum(ends - 1, 0)], np.nan)
    count, sconf, shit = count[0, 0], sconf[0, 0], shit[0, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(count > 0, sconf / count, np.nan)
        accuracy = np.where(count > 0, shit / count, np.nan)
    return {
        "lower": np.asarray(lower, dtype=np.float64),
        "upper": np.asarray(upper, dtype=np.float64),
        "count": np.asarray(count, dtype=np.int64),
        "confidence": confidence,
        "accuracy": accuracy,
    }


def brier_score(
    probs: np.ndarray, labels: np.ndarray, *, indices: np.ndarray | None = None
) -> float | np.ndarray:
    """Multiclass Brier score: mean over samples of ``sum_c (p_c - y_c)^2``.

    ``y`` is the one-hot label, so the score lies in [0, 2] (Brier's original
    definition, summed over all classes, binary included). With three or
    more classes this equals scikit-learn's multiclass
    ``brier_score_loss(labels, probs, labels=range(K))`` (scikit-learn >=
    1.7). For a binary problem scikit-learn scores the positive class only,
    ``mean (p_1 - y)^2`` in [0, 1], which is *half* of this value.

    Parameters
    ----------
    probs : array of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    indices : array of shape (n_resamples, m), optional
        Rows of sample indices; one score per row is returned.

    Returns
    -------
    float, or array of shape (n_resamples,) when ``indices`` is given.

    References
    ----------
    Brier. Verification of forecasts expressed in terms of probability.
    Monthly Weather Review, 1950.

    Examples
    --------
    >>> import numpy as np
    >>> round(brier_score(np.array([[0.25, 0.75], [1.0, 0.0]]), np.array([1, 0])), 4)
    0.0625
    """
    p, y = _checked(probs, labels)
    rows = _checked_indices(indices, p.shape[0])
    p_true = p[np.arange(p.shape[0]), y].astype(np.float64)
    squares = np.einsum("ij,ij->i", p, p, dtype=np.float64)
    per_sample = squares - 2.0 * p_true + 1.0
    return _mean(per_sample, rows)


def negative_log_likelihood(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    eps: float = 1e-12,
    indices: np.ndarray | None = None,
) -> float | np.ndarray:
    """Mean negative log-likelihood (cross-entropy) of the labels, natural log.

    ``-mean log max(p_label, eps)``. The clipping keeps a zero probability on
    the true class finite. scikit-learn's ``log_loss`` clips at the machine
    epsilon of the input's dtype (about 2.2e-16 for float64, 1.2e-7 for
    float32), so the two agree unless a true-class probability lies below
    the larger of the two bounds.

    Parameters
    ----------
    probs : array of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    eps : float, default 1e-12
        Lower clip on the true-class probability.
    indices : array of shape (n_resamples, m), optional
        Rows of sample indices; one value per row is returned.

    Returns
    -------
    float, or array of shape (n_resamples,) when ``indices`` is given.

    Examples
    --------
    >>> import numpy as np
    >>> nll = negative_log_likelihood(np.array([[0.5, 0.5], [0.0, 1.0]]), np.array([0, 1]))
    >>> bool(np.isclose(nll, np.log(2) / 2))
    True
    """
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ConfigError(f"eps: expected a number in (0, 1), got {eps!r}")
    p, y = _checked(probs, labels)
    rows = _checked_indices(indices, p.shape[0])
    p_true = p[np.arange(p.shape[0]), y].astype(np.float64)
    per_sample = -np.log(np.maximum(p_true, eps))
    return _mean(per_sample, rows)


def _mean(per_sample: np.ndarray, rows: np.ndarray | None) -> float | np.ndarray:
    if rows is None:
        return float(per_sample.mean())
    return np.concatenate(
        [per_sample[chunk].mean(axis=1) for chunk in _row_chunks(rows, rows.shape[1])]
    )
