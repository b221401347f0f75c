"""Early-exit cascade: run members in order, let confident samples leave early."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from modelfuse.arrays import check_labels
from modelfuse.ensemble.voting import Kind, check_ensemble_predictions, member_probabilities
from modelfuse.errors import ConfigError
from modelfuse.evaluation.selective import RiskCoverageCurve, risk_coverage_curve

__all__ = ["CascadeResult", "early_exit_cascade"]


@dataclass(frozen=True)
class CascadeResult:
    """The cascade's predictions and what it cost.

    Attributes
    ----------
    probabilities : array of shape (n_samples, n_classes)
        Each sample's prediction at the stage where it left.
    exit_stage : array of shape (n_samples,)
        The 0-based stage (member) after which each sample left.
    share_per_stage : array of shape (n_models,)
        Share of samples leaving after each stage (sums to one).
    compute_saved : float
        ``1 - mean cost / cost of running every member``, with the members'
        costs as given (equal by default).
    risk_coverage : RiskCoverageCurve or None
        With ``labels``: the risk-coverage curve (AURC, E-AURC) of the
        cascade's predictions, confidence = their top-label probability, i.e.
        what abstaining on the least confident samples would cost.
    """

    probabilities: np.ndarray
    exit_stage: np.ndarray
    share_per_stage: np.ndarray
    compute_saved: float
    risk_coverage: RiskCoverageCurve | None = None


def early_exit_cascade(
    predictions: np.ndarray | Sequence[np.ndarray],
    *,
    kind: Kind,
    threshold: float = 0.5,
    window: float = 0.25,
    costs: Sequence[float] | None = None,
    combine: Literal["running", "member"] = "running",
    labels: np.ndarray | None = None,
) -> CascadeResult:
    """Members run in order; a sample leaves once its prediction is outside the uncertain window.

    At stage ``k`` the prediction is the average of members ``0..k``
    (``combine="running"``, the committee of Wang et al.) or member ``k``
    alone (``combine="member"``). A sample stays while it is uncertain:

    - two classes: ``|p_1 - threshold| <= window`` (the window around the
      decision threshold on the positive-class probability);
    - more classes: top-label confidence ``<= threshold + window`` (the
      confidence has no lower side that means "certain").

    Every sample still there at the last stage leaves with its prediction.
    The predictions of all members are given, so this computes which
    members each sample *would* have needed.

    Parameters
    ----------
    predictions : array of shape (n_models, n_samples, n_classes) or a sequence
        Members in the order they run (cheapest first, usually).
    kind : {"probabilities", "logits"}
    threshold : float, default 0.5
    window : float, default 0.25
        Half-width of the uncertain window, >= 0.
    costs : sequence of n_models floats, optional
        Cost of running each member (e.g. FLOPs or seconds); equal when omitted.
    combine : {"running", "member"}, default "running"
    labels : array of shape (n_samples,), optional
        When given, the result carries the risk-coverage curve of the
        cascade's predictions.

    Returns
    -------
    CascadeResult

    References
    ----------
    Wang, Kondratyuk, Christiansen, Kitani, Alon, Eban. Wisdom of committees:
    an overlooked approach to faster and more accurate models. ICLR 2022.

    Examples
    --------
    >>> import numpy as np
    >>> first = np.array([[0.95, 0.05], [0.55, 0.45]])
    >>> second = np.array([[0.9, 0.1], [0.1, 0.9]])
    >>> r = early_exit_cascade([first, second], kind="probabilities", combine="member")
    >>> r.exit_stage, r.share_per_stage, r.compute_saved
    (array([0, 1]), array([0.5, 0.5]), 0.25)
    """
    if combine not in ("running", "member"):
        raise ConfigError(f"combine: expected 'running' or 'member', got {combine!r}")
    if not np.isfinite(threshold):
        raise ConfigError(f"threshold: expected a finite number, got {threshold!r}")
    if not (np.isfinite(window) and window >= 0):
        raise ConfigError(f"window: expected a finite number >= 0, got {window!r}")
    p = member_probabilities(check_ensemble_predictions(predictions, kind), kind)
    n_models, n_samples, n_classes = p.shape
    if costs is None:
        cost = np.ones(n_models)
    else:
        cost = np.asarray(costs, dtype=np.float64)
        if cost.shape != (n_models,) or not np.isfinite(cost).all() or (cost < 0).any():
            raise ConfigError(
                f"costs: expected {n_models} finite non-negative numbers, got {costs!r}"
            )
        if cost.sum() <= 0:
            raise ConfigError("costs: the members' costs sum to 0")
    if combine == "running":
        stages = np.cumsum(p, axis=0, dtype=np.float64)
        stages /= np.arange(1, n_models + 1)[:, None, None]
    else:
        stages = p.astype(np.float64)
    if n_classes == 2:
        certain = np.abs(stages[..., 1] - threshold) > window
    else:
        certain = stages.max(axis=2) > threshold + window
    certain[-1] = True
    exit_stage = certain.argmax(axis=0)
    probabilities = stages[exit_stage, np.arange(n_samples)]
    share = np.bincount(exit_stage, minlength=n_models) / n_samples
    spent = np.cumsum(cost)[exit_stage].mean()
    curve = None
    if labels is not None:
        y = check_labels(labels, n_samples=n_samples, n_classes=n_classes)
        curve = risk_coverage_curve(probabilities.max(axis=1), probabilities.argmax(axis=1) == y)
    return CascadeResult(
        probabilities=probabilities,
        exit_stage=exit_stage,
        share_per_stage=share,
        compute_saved=float(1.0 - spent / cost.sum()),
        risk_coverage=curve,
    )
