"""Selective prediction: risk-coverage curves, AURC and E-AURC for any confidence score.

A selective classifier answers on the samples it is most confident about
and abstains on the rest. Sorting the samples by confidence (descending),
covering the first ``k`` gives coverage ``k / n`` and selective risk = the
error rate among those ``k``. The area under this risk-coverage curve (AURC,
Geifman and El-Yaniv 2017) is ``(1/n) sum_{k=1..n} risk(k)``; E-AURC
(Geifman et al. 2019) subtracts the AURC of the oracle ordering (every
correct sample before every error), so it measures the ranking alone, not
the accuracy.

Ties in confidence are one block: a threshold either covers all of a block
or none of it, so the curve has one point per distinct confidence. Inside a
block the error count is interpolated linearly, which makes the AURC the
mean over every order of the tied samples (ties neither help nor hurt).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from modelfuse.arrays import check_predictions
from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation.bootstrap import (
    IntervalMethod,
    RandomState,
    _method_label,
    _Plan,
    _result,
    _run,
)
from modelfuse.evaluation.metrics import MetricSpec
from modelfuse.evaluation.results import IntervalResult

__all__ = [
    "CONFIDENCE_SCORES",
    "SELECTIVE_METRICS",
    "RiskCoverageCurve",
    "aurc",
    "bootstrap_selective",
    "confidence_scores",
    "e_aurc",
    "entropy",
    "risk_coverage_curve",
    "risk_coverage_plot",
]

ConfidenceScore = Literal["max_probability", "negative_entropy", "negative_mutual_information"]
SelectiveMetric = Literal["aurc", "e_aurc"]
_ROW_ELEMENTS = 1 << 18  # resamples x samples per batch of the vectorised AURC


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy ``-sum_c p_c log p_c`` of each row (last axis), in nats; ``0 log 0 = 0``.

    Examples
    --------
    >>> import numpy as np
    >>> entropy(np.array([[0.5, 0.5], [1.0, 0.0]])).round(4)
    array([0.6931, 0.    ])
    """
    p = np.asarray(probs, dtype=np.float64)
    logs = np.log(np.where(p > 0, p, 1.0))
    return 0.0 - (p * logs).sum(axis=-1)  # 0.0 - x: no negative zero


def _max_probability(p: np.ndarray) -> np.ndarray:
    return (p.mean(axis=0) if p.ndim == 3 else p).max(axis=-1)


def _negative_entropy(p: np.ndarray) -> np.ndarray:
    return -entropy(p.mean(axis=0) if p.ndim == 3 else p)


def _negative_mutual_information(p: np.ndarray) -> np.ndarray:
    if p.ndim != 3:
        raise DataError(
            "predictions: negative_mutual_information needs the members' predictions, "
            f"shape (n_models, n_samples, n_classes); got shape {p.shape}"
        )
    return -np.maximum(entropy(p.mean(axis=0)) - entropy(p).mean(axis=0), 0.0)


CONFIDENCE_SCORES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max_probability": _max_probability,
    "negative_entropy": _negative_entropy,
    "negative_mutual_information": _negative_mutual_information,
}


def confidence_scores(
    predictions: np.ndarray,
    *,
    score: ConfidenceScore = "max_probability",
    kind: Literal["probabilities", "logits"] = "probabilities",
) -> np.ndarray:
    """One confidence per sample (higher means more confident) from predictions.

    Parameters
    ----------
    predictions : array of shape (n_samples, n_classes) or (n_models, n_samples, n_classes)
        One model's predictions, or an ensemble's members (the first two
        scores then use the members' mean probabilities).
    score : {"max_probability", "negative_entropy", "negative_mutual_information"}
        ``max_c p_c``; ``-H[p]``; ``-(H[mean_m p_m] - mean_m H[p_m])``, the
        negative epistemic uncertainty, which needs members.
    kind : {"probabilities", "logits"}, default "probabilities"
        Logits are softmaxed (per member).

    Returns
    -------
    array of shape (n_samples,)

    Examples
    --------
    >>> import numpy as np
    >>> confidence_scores(np.array([[0.9, 0.1], [0.6, 0.4]]))
    array([0.9, 0.6])
    """
    if score not in CONFIDENCE_SCORES:
        raise ConfigError(
            f"score: unknown {str(score)[:40]!r}; expected one of {', '.join(CONFIDENCE_SCORES)}"
        )
    p = check_predictions(predictions, kind, source="predictions")
    if p.ndim not in (2, 3):
        raise DataError(
            "predictions: expected shape (n_samples, n_classes) or "
            f"(n_models, n_samples, n_classes), got {p.shape}"
        )
    if kind == "logits":
        from modelfuse.calibration.softmax import softmax

        p = softmax(p)
    return CONFIDENCE_SCORES[score](p.astype(np.float64))


def _check_selective(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidence)
    if c.ndim != 1 or c.size == 0:
        raise DataError(
            f"confidence: expected shape (n_samples,) with n_samples >= 1, got {c.shape}"
        )
    if c.dtype.kind not in "biuf" or not np.isfinite(c.astype(np.float64)).all():
        raise DataError(
            "confidence: expected finite numbers (one per sample); found NaN, inf or non-numbers"
        )
    r = np.asarray(correct)
    if r.shape != c.shape:
        raise DataError(f"correct: expected shape {c.shape} (one per confidence), got {r.shape}")
    if r.dtype.kind not in "biuf" or not np.isin(r, (0, 1)).all():
        raise DataError("correct: expected booleans (or 0/1): whether each prediction is right")
    return c.astype(np.float64), r.astype(bool)


def _aurc_rows(confidence: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AURC and oracle AURC of each row of (confidence, error) arrays of shape (c, m)."""
    c, m = confidence.shape
    order = np.argsort(-confidence, axis=1, kind="stable")
    conf = np.take_along_axis(confidence, order, axis=1)
    err = np.take_along_axis(errors, order, axis=1).astype(np.float64)
    cum = np.zeros((c, m + 1))
    np.cumsum(err, axis=1, out=cum[:, 1:])
    position = np.broadcast_to(np.arange(m), (c, m))
    new_block = np.ones((c, m), dtype=bool)
    new_block[:, 1:] = conf[:, 1:] != conf[:, :-1]
    start = np.maximum.accumulate(np.where(new_block, position, 0), axis=1)
    is_end = np.ones((c, m), dtype=bool)
    is_end[:, :-1] = new_block[:, 1:]
    end = np.minimum.accumulate(np.where(is_end, position, m)[:, ::-1], axis=1)[:, ::-1]
    before = np.take_along_axis(cum, start, axis=1)
    in_block = np.take_along_axis(cum, end + 1, axis=1) - before
    expected = before + (position - start + 1) * in_block / (end - start + 1)
    covered = np.arange(1, m + 1)
    value = (expected / covered).mean(axis=1)
    n_errors = cum[:, -1:]
    oracle = (np.maximum(covered - (m - n_errors), 0.0) / covered).mean(axis=1)
    return value, oracle


@dataclass(frozen=True)
class RiskCoverageCurve:
    """A risk-coverage curve, one point per distinct confidence (highest first).

    Attributes
    ----------
    coverage : array of shape (n_points,)
        Share of samples covered: those with confidence >= ``threshold``.
    risk : array of shape (n_points,)
        Error rate among the covered samples.
    threshold : array of shape (n_points,)
        The confidence threshold of each point, decreasing.
    aurc : float
        ``(1/n) sum_k risk(k)``, ties averaged over their orders.
    oracle_aurc : float
        The AURC of the oracle ordering with the same errors.
    e_aurc : float
        ``aurc - oracle_aurc`` (>= 0).
    """

    coverage: np.ndarray
    risk: np.ndarray
    threshold: np.ndarray
    aurc: float
    oracle_aurc: float
    e_aurc: float


def risk_coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> RiskCoverageCurve:
    """The risk-coverage curve, AURC and E-AURC of a confidence score.

    Parameters
    ----------
    confidence : array of shape (n_samples,)
        Any score, higher meaning more confident (see :func:`confidence_scores`).
    correct : array of bool of shape (n_samples,)
        Whether each prediction is right, e.g. ``probs.argmax(axis=1) == labels``.

    Returns
    -------
    RiskCoverageCurve

    References
    ----------
    Geifman, El-Yaniv. Selective classification for deep neural networks. NIPS 2017.
    Geifman, Uziel, El-Yaniv. Bias-reduced uncertainty estimation for deep
    neural classifiers. ICLR 2019 (E-AURC).

    Examples
    --------
    >>> import numpy as np
    >>> curve = risk_coverage_curve(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]))
    >>> curve.coverage.round(3), curve.risk.round(3)
    (array([0.333, 0.667, 1.   ]), array([0.   , 0.5  , 0.333]))
    >>> round(curve.aurc, 4), round(curve.e_aurc, 4)
    (0.2778, 0.1667)
    """
    c, right = _check_selective(confidence, correct)
    n = c.size
    order = np.argsort(-c, kind="stable")
    sorted_conf = c[order]
    errors = np.cumsum(~right[order])
    ends = np.flatnonzero(np.append(sorted_conf[1:] != sorted_conf[:-1], True))
    value, oracle = _aurc_rows(c[None, :], ~right[None, :])
    return RiskCoverageCurve(
        coverage=(ends + 1) / n,
        risk=errors[ends] / (ends + 1),
        threshold=sorted_conf[ends],
        aurc=float(value[0]),
        oracle_aurc=float(oracle[0]),
        e_aurc=float(max(value[0] - oracle[0], 0.0)),
    )


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve; see :func:`risk_coverage_curve`.

    Examples
    --------
    >>> import numpy as np
    >>> aurc(np.array([0.9, 0.8]), np.array([False, True]))
    0.75
    """
    return risk_coverage_curve(confidence, correct).aurc


def e_aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Excess AURC over the oracle ordering; see :func:`risk_coverage_curve`.

    Examples
    --------
    >>> import numpy as np
    >>> e_aurc(np.array([0.9, 0.8]), np.array([False, True]))
    0.5
    """
    return risk_coverage_curve(confidence, correct).e_aurc


def _selective_spec(metric: str) -> MetricSpec:
    """A metric of the (n, 2) array [confidence, error] for the bootstrap machinery."""

    def on_rows(data: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.empty(rows.shape[0])
        step = max(1, _ROW_ELEMENTS // max(1, rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            part = rows[start : start + step]
            value, oracle = _aurc_rows(data[part, 0], data[part, 1])
            out[start : start + step] = value if metric == "aurc" else value - oracle
        return out

    def function(data: np.ndarray, labels: np.ndarray) -> float:
        return float(on_rows(data, labels, np.arange(data.shape[0])[None, :])[0])

    return MetricSpec(metric, False, function, on_rows=on_rows)


SELECTIVE_METRICS: dict[str, str] = {
    "aurc": "area under the risk-coverage curve",
    "e_aurc": "AURC minus the AURC of the oracle ordering",
}


def bootstrap_selective(
    confidence: np.ndarray,
    correct: np.ndarray,
    *,
    metric: SelectiveMetric = "aurc",
    method: IntervalMethod = "bca",
    confidence_level: float = 0.95,
    n_resamples: int = 2000,
    random_state: RandomState = None,
    name: str = "model",
) -> IntervalResult:
    """AURC or E-AURC with a bootstrap confidence interval.

    Samples are resampled with replacement (the confidences and correctness
    together) by :mod:`modelfuse.evaluation.bootstrap`'s machinery: BCa
    where stable, else percentile; ``result.method_used`` says which.

    Parameters
    ----------
    confidence : array of shape (n_samples,)
    correct : array of bool of shape (n_samples,)
    metric : {"aurc", "e_aurc"}, default "aurc"
    method : {"bca", "percentile"}, default "bca"
    confidence_level : float, default 0.95
    n_resamples : int, default 2000
    random_state : int or numpy.random.Generator, optional
    name : str
        What the result says was measured.

    Returns
    -------
    IntervalResult

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> conf = rng.random(300); right = rng.random(300) < conf
    >>> r = bootstrap_selective(conf, right, n_resamples=1000, random_state=0)
    >>> bool(r.ci[0] < r.statistic < r.ci[1])
    True
    """
    if metric not in SELECTIVE_METRICS:
        raise ConfigError(
            f"metric: unknown {str(metric)[:40]!r}; expected one of {', '.join(SELECTIVE_METRICS)}"
        )
    c, right = _check_selective(confidence, correct)
    data = np.column_stack([c, (~right).astype(np.float64)])
    spec = _selective_spec(metric)
    plan = _Plan(spec, [data], np.zeros(c.size, dtype=np.int64), [1.0])
    estimate, inference, distribution = _run(
        plan,
        method=method,
        confidence_level=confidence_level,
        n_resamples=n_resamples,
        stratify=False,
        random_state=random_state,
    )
    return _result(
        plan,
        estimate,
        inference,
        distribution,
        label=_method_label(inference, False, None),
        compared=(metric, name),
        confidence_level=confidence_level,
        n_resamples=n_resamples,
    )


def risk_coverage_plot(
    curves: Mapping[str, RiskCoverageCurve], path: str | Path, *, title: str | None = None
) -> Path:
    """Draw risk-coverage curves (one per name) into a PNG file.

    Each curve is drawn as steps through its points, from full coverage
    down to the most confident block; the legend gives AURC and E-AURC.

    Parameters
    ----------
    curves : mapping of str to RiskCoverageCurve
    path : str or Path
        The PNG file to write (replaced if it exists).
    title : str, optional

    Returns
    -------
    Path

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> curve = risk_coverage_curve(np.array([0.9, 0.8, 0.6]), np.array([True, True, False]))
    >>> risk_coverage_plot({"model": curve}, os.path.join(tempfile.mkdtemp(), "rc.png")).suffix
    '.png'
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), layout="constrained")
    axes = fig.subplots()
    for name, curve in curves.items():
        axes.step(
            np.concatenate([[0.0], curve.coverage]),
            np.concatenate([[curve.risk[0]], curve.risk]),
            where="pre",
            label=f"{name[:40]}: AURC {curve.aurc:.4f}, E-AURC {curve.e_aurc:.4f}",
        )
    axes.set_xlim(0, 1)
    axes.set_ylim(bottom=0)
    axes.set_xlabel("coverage (share of samples answered, most confident first)")
    axes.set_ylabel("selective risk (error rate among the answered)")
    axes.set_title(title or "Risk-coverage")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize="small")
    target = Path(path)
    fig.savefig(target, format="png", dpi=120)
    return target
