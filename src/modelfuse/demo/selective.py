"""Knowing when not to trust a prediction: risk-coverage curves of the demo's candidates.

Each candidate answers the test images it is most confident about (its
largest class probability) and abstains on the rest; the risk-coverage
curve gives its error rate at every coverage, AURC its area and E-AURC the
area above the oracle's (the ranking alone, not the accuracy), with
bootstrap intervals (:mod:`modelfuse.evaluation.selective`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from modelfuse.demo.evaluate import probabilities
from modelfuse.evaluation.selective import RiskCoverageCurve

__all__ = ["SelectiveRow", "selective_row"]


@dataclass(frozen=True)
class SelectiveRow:
    """One candidate's selective prediction on one split.

    Attributes
    ----------
    name : str
    curve : RiskCoverageCurve
    aurc, e_aurc : (float, (float, float))
        The value and its bootstrap interval.
    intervals : dict
        ``"aurc"`` and ``"e_aurc"`` to the interval method used (``"bca"``, or
        ``"percentile"`` where BCa is unstable).
    """

    name: str
    curve: RiskCoverageCurve
    aurc: tuple[float, tuple[float, float]]
    e_aurc: tuple[float, tuple[float, float]]
    intervals: dict[str, str]


def selective_row(
    name: str,
    log_probs: np.ndarray,
    labels: np.ndarray,
    *,
    n_resamples: int,
    seed: int,
    interval: Literal["bca", "percentile"] = "bca",
) -> SelectiveRow:
    """The risk-coverage curve (confidence: the largest probability), AURC and E-AURC with
    95% bootstrap intervals of one candidate.

    Examples
    --------
    The one error is the least confident prediction: risks 0, 0, 0, 1/4 as
    coverage grows, so AURC = (1/4) / 4 and the ranking is the oracle's.

    >>> lp = np.log([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    >>> row = selective_row("m", lp, np.array([0, 1, 0, 1]), n_resamples=200, seed=0)
    >>> round(row.aurc[0], 4), round(row.e_aurc[0], 4)
    (0.0625, 0.0)
    """
    from modelfuse.evaluation.selective import bootstrap_selective, risk_coverage_curve

    p = probabilities(log_probs)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == np.asarray(labels)
    curve = risk_coverage_curve(confidence, correct)
    values = {}
    methods = {}
    for i, metric in enumerate(("aurc", "e_aurc")):
        r = bootstrap_selective(
            confidence,
            correct,
            metric=metric,  # type: ignore[arg-type]
            method=interval,
            n_resamples=n_resamples,
            random_state=seed + i,
            name=name,
        )
        values[metric] = (float(r.statistic), (float(r.ci[0]), float(r.ci[1])))
        methods[metric] = str(r.method_used)
    return SelectiveRow(name, curve, values["aurc"], values["e_aurc"], methods)
