"""Classification metrics and the registry that the bootstrap and the tests resample.

Every metric takes ``probs`` of shape (n_samples, n_classes) and integer
``labels`` of shape (n_samples,). Accuracy, balanced accuracy, macro F1 and
AUROC live here; NLL, the Brier score and the ECE are those of
:mod:`modelfuse.calibration.metrics` (one definition in the project).

Metrics that are a function of sums over samples (accuracy, balanced accuracy,
macro F1, and NLL and Brier as means of per-sample losses) declare those sums,
so that bootstrap resamples, jackknife values and permutations are computed
for all resamples at once from counts instead of one metric call per resample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import numpy as np
import scipy.sparse
from scipy.special import softmax
from scipy.stats import rankdata

from modelfuse.arrays import check_labels, check_predictions
from modelfuse.errors import ConfigError, DataError

__all__ = [
    "METRICS",
    "MetricSpec",
    "accuracy",
    "auroc",
    "balanced_accuracy",
    "get_metric",
    "macro_f1",
    "prepare_predictions",
]

PredictionKind = Literal["probabilities", "logits"]


def prepare_predictions(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    kind: PredictionKind = "probabilities",
    source: str = "predictions",
    labels_source: str = "labels",
) -> tuple[np.ndarray, np.ndarray]:
    """Check predictions and labels; return float64 probabilities and int64 labels.

    Parameters
    ----------
    probs : array of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    kind : {"probabilities", "logits"}
        Logits are turned into probabilities with a softmax over the last axis.
    source, labels_source : str
        Name the arrays in error messages.

    Returns
    -------
    probs : numpy.ndarray of float64, a new array (the caller's is never modified)
    labels : numpy.ndarray of int64

    Examples
    --------
    >>> p, y = prepare_predictions([[2.0, 0.0]], [0], kind="logits")
    >>> round(float(p[0, 0]), 3), y.tolist()
    (0.881, [0])
    """
    array = check_predictions(np.asarray(probs), kind, source=source)
    if array.ndim != 2:
        raise DataError(f"{source}: expected shape (n_samples, n_classes), got {array.shape}")
    if array.shape[1] < 2:
        raise DataError(
            f"{source}: expected at least 2 classes (columns), got {array.shape[1]}; "
            "for a binary score give two columns (1 - p, p)"
        )
    array = np.array(array, dtype=np.float64, copy=True)
    if kind == "logits":
        array = softmax(array, axis=1)
    y = check_labels(
        labels, n_samples=array.shape[0], n_classes=array.shape[1], source=labels_source
    )
    return array, y


# --------------------------------------------------------------------------- sums


def _onehot_rows(columns: np.ndarray, values: np.ndarray, width: int) -> scipy.sparse.csr_matrix:
    """Sparse (len(columns), width) matrix with ``values[i]`` at ``(i, columns[i])``."""
    n = len(columns)
    return scipy.sparse.csr_matrix(
        (values.astype(np.float64), (np.arange(n), columns.astype(np.int64))), shape=(n, width)
    )


def _accuracy_keys(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (probs.argmax(axis=1) == labels).astype(np.float64)[:, None]


def _value_rows(keys: np.ndarray, n_classes: int) -> scipy.sparse.csr_matrix:
    return scipy.sparse.csr_matrix(keys[:, :1].astype(np.float64))


def _mean_from_sums(sums: np.ndarray, n: int) -> np.ndarray:
    return sums[..., 0] / n


def _label_pred_keys(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.stack([labels, probs.argmax(axis=1)], axis=1).astype(np.float64)


def _balanced_rows(keys: np.ndarray, n_classes: int) -> scipy.sparse.csr_matrix:
    y = keys[:, 0].astype(np.int64)
    correct = (keys[:, 0] == keys[:, 1]).astype(np.float64)
    return scipy.sparse.hstack(
        [_onehot_rows(y, correct, n_classes), _onehot_rows(y, np.ones(len(y)), n_classes)],
        format="csr",
    )


def _balanced_from_sums(sums: np.ndarray, n: int) -> np.ndarray:
    k = sums.shape[-1] // 2
    hits, support = sums[..., :k], sums[..., k:]
    present = support > 0
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=present)
    return recall.sum(axis=-1) / present.sum(axis=-1)


def _f1_rows(keys: np.ndarray, n_classes: int) -> scipy.sparse.csr_matrix:
    y = keys[:, 0].astype(np.int64)
    pred = keys[:, 1].astype(np.int64)
    correct = (y == pred).astype(np.float64)
    wrong = 1.0 - correct
    return scipy.sparse.hstack(
        [
            _onehot_rows(y, correct, n_classes),  # true positives
            _onehot_rows(pred, wrong, n_classes),  # false positives
            _onehot_rows(y, wrong, n_classes),  # false negatives
        ],
        format="csr",
    )


def _f1_from_sums(sums: np.ndarray, n: int) -> np.ndarray:
    k = sums.shape[-1] // 3
    tp, fp, fn = sums[..., :k], sums[..., k : 2 * k], sums[..., 2 * k :]
    denominator = 2 * tp + fp + fn
    present = denominator > 0  # the classes in labels or predictions, as scikit-learn averages
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=present)
    return f1.sum(axis=-1) / present.sum(axis=-1)


def _from_label_pred_sums(
    rows: Callable[[np.ndarray, int], scipy.sparse.csr_matrix],
    from_sums: Callable[[np.ndarray, int], np.ndarray],
    probs: np.ndarray,
    labels: np.ndarray,
) -> float:
    """A metric of per-(label, prediction) sums on all samples: ``rows`` summed once."""
    keys = _label_pred_keys(probs, labels)
    sums = np.asarray(rows(keys, probs.shape[1]).sum(axis=0)).ravel()
    return float(from_sums(sums, len(labels)))


# --------------------------------------------------------------------------- metrics


def accuracy(
    probs: np.ndarray, labels: np.ndarray, *, kind: PredictionKind = "probabilities"
) -> float:
    """Share of samples whose most probable class is the label.

    Ties between classes go to the lowest class index (``argmax``).

    Parameters
    ----------
    probs : array of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    kind : {"probabilities", "logits"}

    Returns
    -------
    float

    Examples
    --------
    >>> accuracy([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], [0, 1, 1])
    0.6666666666666666
    """
    p, y = prepare_predictions(probs, labels, kind=kind)
    return _accuracy(p, y)


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == labels))


def balanced_accuracy(
    probs: np.ndarray, labels: np.ndarray, *, kind: PredictionKind = "probabilities"
) -> float:
    """Mean over the classes present in ``labels`` of the recall of each class.

    Parameters
    ----------
    probs : array of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    kind : {"probabilities", "logits"}

    Returns
    -------
    float

    References
    ----------
    Brodersen, Ong, Stephan and Buhmann, "The balanced accuracy and its
    posterior distribution", ICPR 2010.

    Examples
    --------
    >>> balanced_accuracy([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8]], [0, 0, 0, 1])
    1.0
    """
    p, y = prepare_predictions(probs, labels, kind=kind)
    return _balanced_accuracy(p, y)


def _balanced_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return _from_label_pred_sums(_balanced_rows, _balanced_from_sums, probs, labels)


def macro_f1(
    probs: np.ndarray, labels: np.ndarray, *, kind: PredictionKind = "probabilities"
) -> float:
    """Unweighted mean of the per-class F1 scores.

    Averages over the classes that occur in the labels or the predictions, as
    ``sklearn.metrics.f1_score(average="macro")`` does.

    Parameters
    ----------
    probs : array of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    kind : {"probabilities", "logits"}

    Returns
    -------
    float

    Examples
    --------
    >>> macro_f1([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], [0, 1, 1])
    0.6666666666666666
    """
    p, y = prepare_predictions(probs, labels, kind=kind)
    return _macro_f1(p, y)


def _macro_f1(probs: np.ndarray, labels: np.ndarray) -> float:
    return _from_label_pred_sums(_f1_rows, _f1_from_sums, probs, labels)


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks: ties count one half (Mann-Whitney)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    average: Literal["macro", "weighted"] = "macro",
    kind: PredictionKind = "probabilities",
) -> float:
    """Area under the ROC curve; one-vs-rest for more than two classes.

    Computed from ranks (the Mann-Whitney statistic divided by the number of
    positive-negative pairs; tied scores count one half). With two classes it
    is the AUROC of ``probs[:, 1]`` for class 1; with more, the mean of the
    one-vs-rest AUROCs of each class's column (``average="macro"``) or their
    mean weighted by class frequency (``"weighted"``), as
    ``sklearn.metrics.roc_auc_score(multi_class="ovr")``.

    Parameters
    ----------
    probs : array of shape (n_samples, n_classes)
    labels : array of shape (n_samples,)
    average : {"macro", "weighted"}
    kind : {"probabilities", "logits"}

    Returns
    -------
    float

    Raises
    ------
    DataError
        A class has no positive or no negative sample, so its AUROC is undefined.

    References
    ----------
    Hanley and McNeil, "The meaning and use of the area under a receiver
    operating characteristic (ROC) curve", Radiology 1982.

    Examples
    --------
    >>> auroc([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.4, 0.6]], [0, 0, 1, 1])
    1.0
    """
    if average not in _AUROC_AVERAGES:
        raise ConfigError(
            f"average: unknown value {average!r}; expected one of {', '.join(_AUROC_AVERAGES)}"
        )
    p, y = prepare_predictions(probs, labels, kind=kind)
    value = _auroc(p, y, average=average)
    if not np.isfinite(value):
        raise DataError(
            "labels: AUROC is undefined because a class has no positive or no negative "
            f"sample (class counts {np.bincount(y, minlength=p.shape[1]).tolist()}); "
            "evaluate on data holding every class"
        )
    return value


_AUROC_AVERAGES = ("macro", "weighted")


def _auroc(probs: np.ndarray, labels: np.ndarray, *, average: str = "macro") -> float:
    k = probs.shape[1]
    if k == 2:
        return _binary_auc(labels == 1, probs[:, 1])
    values = np.array([_binary_auc(labels == c, probs[:, c]) for c in range(k)])
    if average == "weighted":
        weights = np.bincount(labels, minlength=k) / len(labels)
        return float(np.sum(weights * values))
    return float(np.mean(values))


def _weighted_binary_auc(
    positive: np.ndarray, scores: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC of each row of sample weights, and the weighted positive count of each row.

    The scores are sorted once; along each row, every positive counts the
    (weighted) negatives scored below it plus half of those tied with it: the
    Mann-Whitney statistic with integer weights, i.e. the AUROC of the samples
    repeated that many times.
    """
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    w = weights[:, order]
    pos_w = w * positive[order]
    neg_w = w - pos_w
    pairs = pos_w.sum(axis=1, dtype=np.float64) * neg_w.sum(axis=1, dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(ordered)) + 1
    if len(boundaries) == len(ordered) - 1:  # no ties: one cumulative sum
        wins = np.sum(pos_w * np.cumsum(neg_w, axis=1), axis=1, dtype=np.float64)
    else:  # sum positives and negatives per distinct score first
        starts = np.concatenate([[0], boundaries])
        pos_g = np.add.reduceat(pos_w, starts, axis=1)
        neg_g = np.add.reduceat(neg_w, starts, axis=1)
        below = np.cumsum(neg_g, axis=1) - neg_g
        wins = np.sum(pos_g * (below + 0.5 * neg_g), axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)
    return auc, pos_w.sum(axis=1, dtype=np.float64)


def _auroc_on_weights(
    probs: np.ndarray, labels: np.ndarray, weights: np.ndarray, *, average: str = "macro"
) -> np.ndarray:
    """AUROC (binary, or one-vs-rest) of each row of per-sample weights (resample counts)."""
    k = probs.shape[1]
    if k == 2:
        return _weighted_binary_auc(labels == 1, probs[:, 1], weights)[0]
    aucs, supports = zip(
        *(_weighted_binary_auc(labels == c, probs[:, c], weights) for c in range(k))
    )
    auc = np.stack(aucs, axis=1)
    if average == "weighted":
        support = np.stack(supports, axis=1)
        share = support / support.sum(axis=1, keepdims=True)
        return np.sum(share * auc, axis=1)  # undefined (NaN) when a class is absent
    return auc.mean(axis=1)


# --------------------------------------------------------------------------- calibration metrics


def _calibration() -> ModuleType:
    try:
        from modelfuse.calibration import metrics
    except ImportError as exc:  # pragma: no cover - the module ships with the package
        raise ConfigError(
            f"metric: modelfuse.calibration.metrics cannot be imported ({exc}); "
            "choose accuracy, balanced_accuracy, macro_f1 or auroc"
        ) from None
    return metrics


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(_calibration().negative_log_likelihood(probs, labels))


def _brier(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(_calibration().brier_score(probs, labels))


def _ece(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(_calibration().expected_calibration_error(probs, labels))


def _ece_on_rows(probs: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.asarray(_calibration().expected_calibration_error(probs, labels, indices=rows))


_ECE_BINS = 15  # the calibration module's default: equal-width bins, top-label, l1


def _ece_keys(probs: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    # ECE = sum_b |sum_{i in b} (hit_i - conf_i)| / n: a function of per-bin sums. The keys
    # (bin, hit - conf) are used only when they reproduce the calibration module's ECE.
    calibration = _calibration()
    pred = probs.argmax(axis=1)
    conf = probs[np.arange(len(labels)), pred]
    hit = (pred == labels).astype(np.float64)
    bins = calibration.bin_index(np.linspace(0.0, 1.0, _ECE_BINS + 1), conf)
    keys = np.stack([bins.astype(np.float64), hit - conf], axis=1)
    sums = np.bincount(bins, weights=keys[:, 1], minlength=_ECE_BINS)
    if not np.isclose(np.abs(sums).sum() / len(labels), _ece(probs, labels), rtol=1e-9, atol=1e-12):
        return None
    return keys


def _ece_rows(keys: np.ndarray, n_classes: int) -> scipy.sparse.csr_matrix:
    return _onehot_rows(keys[:, 0].astype(np.int64), keys[:, 1], _ECE_BINS)


def _ece_from_sums(sums: np.ndarray, n: int) -> np.ndarray:
    return np.abs(sums).sum(axis=-1) / n


def _matching_per_sample(candidates: list[np.ndarray], reference: float) -> np.ndarray | None:
    """The first per-sample loss whose mean is the calibration module's value."""
    for values in candidates:
        if np.isclose(values.mean(), reference, rtol=1e-9, atol=1e-12):
            return values
    return None


def _nll_keys(probs: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    # The per-sample terms are used only when their mean reproduces the
    # calibration module's NLL on these data; otherwise the bootstrap calls it.
    picked = probs[np.arange(len(labels)), labels]
    candidates = [-np.log(np.clip(picked, eps, 1.0)) for eps in (1e-12, 1e-15, 1e-7, 1e-300)]
    found = _matching_per_sample(candidates, _nll(probs, labels))
    return None if found is None else found[:, None]


def _brier_keys(probs: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    target = np.zeros_like(probs)
    target[np.arange(len(labels)), labels] = 1.0
    total = ((probs - target) ** 2).sum(axis=1)
    candidates = [total, total / probs.shape[1]]
    if probs.shape[1] == 2:
        candidates.append(total / 2)  # the binary convention (p1 - y)^2
    found = _matching_per_sample(candidates, _brier(probs, labels))
    return None if found is None else found[:, None]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class MetricSpec:
    """How to compute, and how to resample, one metric.

    Attributes
    ----------
    name : str
        The registry key.
    greater_is_better : bool
        True for scores (accuracy), False for losses (NLL, Brier, ECE).
    function : callable
        ``function(probs, labels) -> float`` on checked float64 probabilities.
    keys : callable, optional
        ``keys(probs, labels) -> (n_samples, q) array``: what each sample
        contributes. Samples with equal keys are interchangeable, which lets
        the bootstrap draw counts of distinct keys instead of indices. ``None``
        (or a call returning ``None``) means the metric is not a function of
        sums: it is computed in batches (``on_weights``, ``on_rows``) or once
        per resample.
    rows : callable, optional
        ``rows(unique_keys, n_classes) -> sparse (u, d)``: the additive
        statistics of each distinct key.
    from_sums : callable, optional
        ``from_sums(sums, n_samples) -> metric``, vectorised over leading axes.
    mean_of_keys : bool
        The metric is the mean of the single key column (accuracy, NLL,
        Brier), so differences of models collapse into one per-sample column.
    on_rows : callable, optional
        ``on_rows(probs, labels, index_rows) -> (n_rows,)``: the metric of each
        resample given as a row of sample indices, computed in one call.
    on_weights : callable, optional
        ``on_weights(probs, labels, weights) -> (n_rows,)``: the metric of each
        row of per-sample weights (bootstrap counts, jackknife deletions,
        which of two stacked models' predictions to use), in one call.
    """

    name: str
    greater_is_better: bool
    function: Callable[[np.ndarray, np.ndarray], float]
    keys: Callable[[np.ndarray, np.ndarray], np.ndarray | None] | None = None
    rows: Callable[[np.ndarray, int], scipy.sparse.csr_matrix] | None = None
    from_sums: Callable[[np.ndarray, int], np.ndarray] | None = None
    mean_of_keys: bool = False
    on_rows: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None
    on_weights: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None


METRICS: dict[str, MetricSpec] = {
    "accuracy": MetricSpec(
        "accuracy", True, _accuracy, _accuracy_keys, _value_rows, _mean_from_sums, True
    ),
    "balanced_accuracy": MetricSpec(
        "balanced_accuracy",
        True,
        _balanced_accuracy,
        _label_pred_keys,
        _balanced_rows,
        _balanced_from_sums,
    ),
    "macro_f1": MetricSpec("macro_f1", True, _macro_f1, _label_pred_keys, _f1_rows, _f1_from_sums),
    "auroc": MetricSpec("auroc", True, _auroc, on_weights=_auroc_on_weights),
    "nll": MetricSpec("nll", False, _nll, _nll_keys, _value_rows, _mean_from_sums, True),
    "brier": MetricSpec("brier", False, _brier, _brier_keys, _value_rows, _mean_from_sums, True),
    "ece": MetricSpec(
        "ece", False, _ece, _ece_keys, _ece_rows, _ece_from_sums, on_rows=_ece_on_rows
    ),
}
"""Every metric by name; :func:`get_metric` looks names up here."""


def get_metric(name: str | MetricSpec) -> MetricSpec:
    """Look a metric up in :data:`METRICS`.

    Parameters
    ----------
    name : str or MetricSpec
        A registry key, or a :class:`MetricSpec` (returned unchanged).

    Raises
    ------
    ConfigError
        The name is not a registered metric; the message lists the valid ones.

    Examples
    --------
    >>> get_metric("accuracy").greater_is_better
    True
    """
    if isinstance(name, MetricSpec):
        return name
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"metric: unknown metric {name!r}; expected one of {', '.join(sorted(METRICS))}"
        ) from None
