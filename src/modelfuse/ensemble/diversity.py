"""Uncertainty and diversity of an ensemble's members, and what the diversity buys.

All functions take the members' predictions as one array of shape
(n_models, n_samples, n_classes) (or a sequence of (n_samples, n_classes)
arrays), checked like :func:`modelfuse.ensemble.voting.check_ensemble_predictions`;
logits are softmaxed member by member. Entropies are in nats.

- :func:`uncertainty_decomposition`: total predictive entropy ``H[mean_m p_m]``
  = expected entropy ``mean_m H[p_m]`` (aleatoric) + mutual information
  (epistemic, the difference, >= 0 by concavity of the entropy).
- :func:`pairwise_diversity`: disagreement, Yule's Q-statistic and the
  correlation of errors of every pair of members, as matrices and averaged
  over the pairs.
- :func:`ambiguity_decomposition`: the ensemble's loss as the members' mean
  loss minus their ambiguity, exactly, for the Brier score and the log loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from modelfuse.arrays import check_labels
from modelfuse.ensemble.voting import (
    Kind,
    check_ensemble_predictions,
    check_weights,
    member_probabilities,
)
from modelfuse.errors import ConfigError
from modelfuse.evaluation.selective import entropy

__all__ = [
    "AMBIGUITY_LOSSES",
    "AmbiguityDecomposition",
    "PairwiseDiversity",
    "UncertaintyDecomposition",
    "ambiguity_decomposition",
    "pairwise_diversity",
    "uncertainty_decomposition",
]

AmbiguityLoss = Literal["brier", "nll"]
AMBIGUITY_LOSSES: dict[str, str] = {
    "brier": "sum_c (p_c - y_c)^2 (Krogh and Vedelsby 1995)",
    "nll": "-log p_y of the arithmetic mean of the members' probabilities",
}
_EPS = 1e-300  # log of a probability of exactly 0 is -inf; clip to this before the log


def _probabilities(predictions: np.ndarray | Sequence[np.ndarray], kind: Kind) -> np.ndarray:
    p = check_ensemble_predictions(predictions, kind)
    return member_probabilities(p, kind).astype(np.float64)


@dataclass(frozen=True)
class UncertaintyDecomposition:
    """Per-sample predictive uncertainty of an ensemble, in nats.

    Attributes
    ----------
    total : array of shape (n_samples,)
        ``H[sum_m w_m p_m]``, the entropy of the ensemble's prediction.
    aleatoric : array of shape (n_samples,)
        ``sum_m w_m H[p_m]``, the members' expected entropy.
    epistemic : array of shape (n_samples,)
        ``total - aleatoric``, the mutual information between the prediction
        and the choice of member (>= 0 up to rounding, clipped at 0).
    """

    total: np.ndarray
    aleatoric: np.ndarray
    epistemic: np.ndarray

    @property
    def mean_total(self) -> float:
        """Mean of ``total`` over samples."""
        return float(self.total.mean())

    @property
    def mean_aleatoric(self) -> float:
        """Mean of ``aleatoric`` over samples."""
        return float(self.aleatoric.mean())

    @property
    def mean_epistemic(self) -> float:
        """Mean of ``epistemic`` over samples (the average mutual information)."""
        return float(self.epistemic.mean())


def uncertainty_decomposition(
    predictions: np.ndarray | Sequence[np.ndarray],
    *,
    kind: Kind,
    weights: np.ndarray | Sequence[float] | None = None,
) -> UncertaintyDecomposition:
    """Split the ensemble's predictive entropy into aleatoric and epistemic parts.

    ``H[p_bar] = sum_m w_m H[p_m] + I``, where ``p_bar = sum_m w_m p_m`` and
    ``I`` is the mutual information between the label and the member
    (Depeweg et al. 2018); uniform weights by default.

    Parameters
    ----------
    predictions : array of shape (n_models, n_samples, n_classes) or a sequence
    kind : {"probabilities", "logits"}
    weights : array of shape (n_models,), optional
        Non-negative member weights (normalised); uniform when omitted.

    Returns
    -------
    UncertaintyDecomposition

    References
    ----------
    Depeweg, Hernandez-Lobato, Doshi-Velez, Udluft. Decomposition of
    uncertainty in Bayesian deep learning for efficient and risk-sensitive
    learning. ICML 2018.

    Examples
    --------
    >>> import numpy as np
    >>> sure_a = np.array([[1.0, 0.0]]); sure_b = np.array([[0.0, 1.0]])
    >>> u = uncertainty_decomposition([sure_a, sure_b], kind="probabilities")
    >>> round(u.mean_total, 4), round(u.mean_aleatoric, 4), round(u.mean_epistemic, 4)
    (0.6931, 0.0, 0.6931)
    """
    p = _probabilities(predictions, kind)
    w = check_weights(weights, p.shape[0])
    total = entropy(np.tensordot(w, p, axes=(0, 0)))
    aleatoric = np.tensordot(w, entropy(p), axes=(0, 0))
    return UncertaintyDecomposition(
        total=total, aleatoric=aleatoric, epistemic=np.maximum(total - aleatoric, 0.0)
    )


@dataclass(frozen=True)
class PairwiseDiversity:
    """Diversity of every pair of members.

    Attributes
    ----------
    disagreement : array of shape (n_models, n_models)
        Share of samples on which the two members' predicted classes (argmax,
        first class on ties) differ; 0 on the diagonal.
    q_statistic : array of shape (n_models, n_models) or None
        Yule's Q of the two members' correctness,
        ``(N11 N00 - N10 N01) / (N11 N00 + N10 N01)``; NaN where the
        denominator is 0. ``None`` without labels.
    error_correlation : array of shape (n_models, n_models) or None
        Pearson correlation of the two members' error indicators (the phi
        coefficient); NaN where a member is always right or always wrong.
        ``None`` without labels.
    mean_disagreement, mean_q_statistic, mean_error_correlation : float
        Means over the pairs ``i < j`` (NaN pairs left out; NaN when every
        pair is NaN, or without labels; 0 disagreement for one member).
    """

    disagreement: np.ndarray
    q_statistic: np.ndarray | None
    error_correlation: np.ndarray | None
    mean_disagreement: float
    mean_q_statistic: float
    mean_error_correlation: float


def _mean_over_pairs(matrix: np.ndarray) -> float:
    upper = matrix[np.triu_indices(matrix.shape[0], k=1)]
    upper = upper[np.isfinite(upper)]
    return float(upper.mean()) if upper.size else float("nan")


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def pairwise_diversity(
    predictions: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | None = None,
    *,
    kind: Kind,
) -> PairwiseDiversity:
    """Disagreement, Q-statistic and correlation of errors for every pair of members.

    With ``N11`` the samples both members classify correctly, ``N00`` those
    both get wrong, ``N10`` and ``N01`` those only the first, or only the
    second, gets right (Kuncheva and Whitaker 2003):

    - disagreement ``(N10 + N01) / n`` needs no labels: it is the share of
      samples whose predicted classes differ (which, with labels, can exceed
      the share where exactly one member is right);
    - ``Q = (N11 N00 - N10 N01) / (N11 N00 + N10 N01)`` in [-1, 1];
    - the correlation of errors
      ``(N11 N00 - N10 N01) / sqrt((N11+N10)(N01+N00)(N11+N01)(N10+N00))``.

    Parameters
    ----------
    predictions : array of shape (n_models, n_samples, n_classes) or a sequence
    labels : array of shape (n_samples,), optional
        Needed for the Q-statistic and the correlation of errors.
    kind : {"probabilities", "logits"}

    Returns
    -------
    PairwiseDiversity

    References
    ----------
    Kuncheva, Whitaker. Measures of diversity in classifier ensembles and
    their relationship with the ensemble accuracy. Machine Learning 51 (2003).

    Examples
    --------
    >>> import numpy as np
    >>> a = np.eye(2)[[0, 1, 1, 1]]; b = np.eye(2)[[0, 1, 1, 0]]
    >>> d = pairwise_diversity([a, b], np.array([0, 0, 1, 1]), kind="probabilities")
    >>> d.mean_disagreement, d.mean_q_statistic
    (0.25, 1.0)
    """
    p = check_ensemble_predictions(predictions, kind)
    n_models, n_samples, n_classes = p.shape
    predicted = p.argmax(axis=2)  # softmax keeps the argmax: logits need no conversion
    one_hot = np.zeros((n_models, n_samples, n_classes), dtype=np.float64)
    np.put_along_axis(one_hot, predicted[..., None], 1.0, axis=2)
    agree = np.einsum("ink,jnk->ij", one_hot, one_hot)
    disagreement = 1.0 - agree / n_samples
    np.fill_diagonal(disagreement, 0.0)
    mean_disagreement = _mean_over_pairs(disagreement) if n_models > 1 else 0.0
    if labels is None:
        return PairwiseDiversity(
            disagreement, None, None, mean_disagreement, float("nan"), float("nan")
        )
    y = check_labels(labels, n_samples=n_samples, n_classes=n_classes)
    right = (predicted == y[None, :]).astype(np.float64)
    wrong = 1.0 - right
    n11, n00 = right @ right.T, wrong @ wrong.T
    n10, n01 = right @ wrong.T, wrong @ right.T
    q = _ratio(n11 * n00 - n10 * n01, n11 * n00 + n10 * n01)
    correlation = _ratio(
        n11 * n00 - n10 * n01, np.sqrt((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00))
    )
    return PairwiseDiversity(
        disagreement=disagreement,
        q_statistic=q,
        error_correlation=correlation,
        mean_disagreement=mean_disagreement,
        mean_q_statistic=_mean_over_pairs(q),
        mean_error_correlation=_mean_over_pairs(correlation),
    )


@dataclass(frozen=True)
class AmbiguityDecomposition:
    """``ensemble_loss = mean_member_loss - ambiguity`` (exact, up to rounding).

    Attributes
    ----------
    loss : str
        ``"brier"`` or ``"nll"``.
    ensemble_loss : float
        Loss of the weighted average of the members' probabilities.
    mean_member_loss : float
        ``sum_m w_m loss_m``, the members' weighted mean loss.
    ambiguity : float
        What the diversity buys, >= 0: Brier, ``mean_i sum_m w_m |p_m - p_bar|^2``;
        NLL, ``mean_i (log p_bar_y - sum_m w_m log p_m_y)`` (a Jensen gap).
    member_losses : array of shape (n_models,)
    per_sample_ambiguity : array of shape (n_samples,)
    """

    loss: str
    ensemble_loss: float
    mean_member_loss: float
    ambiguity: float
    member_losses: np.ndarray
    per_sample_ambiguity: np.ndarray


def ambiguity_decomposition(
    predictions: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    kind: Kind,
    loss: AmbiguityLoss = "brier",
    weights: np.ndarray | Sequence[float] | None = None,
) -> AmbiguityDecomposition:
    """The ensemble's loss as the members' mean loss minus their ambiguity.

    For the weighted arithmetic mean ``p_bar = sum_m w_m p_m``:

    - Brier (Krogh and Vedelsby 1995):
      ``|p_bar - y|^2 = sum_m w_m |p_m - y|^2 - sum_m w_m |p_m - p_bar|^2``;
    - log loss: ``-log p_bar_y = sum_m w_m (-log p_m_y) - (log p_bar_y - sum_m w_m log p_m_y)``,
      the last term a Jensen gap (>= 0, the log being concave).

    Both identities hold per sample and so for the means. An ensemble is
    better than its average member by exactly its ambiguity.

    Parameters
    ----------
    predictions : array of shape (n_models, n_samples, n_classes) or a sequence
    labels : array of shape (n_samples,)
    kind : {"probabilities", "logits"}
    loss : {"brier", "nll"}, default "brier"
    weights : array of shape (n_models,), optional
        Non-negative member weights (normalised); uniform when omitted.

    Returns
    -------
    AmbiguityDecomposition

    References
    ----------
    Krogh, Vedelsby. Neural network ensembles, cross validation, and active
    learning. NIPS 1995.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[0.8, 0.2]]); b = np.array([[0.4, 0.6]])
    >>> d = ambiguity_decomposition([a, b], np.array([0]), kind="probabilities")
    >>> round(d.ensemble_loss, 4), round(d.mean_member_loss, 4), round(d.ambiguity, 4)
    (0.32, 0.4, 0.08)
    """
    if loss not in AMBIGUITY_LOSSES:
        raise ConfigError(
            f"loss: unknown {str(loss)[:40]!r}; expected one of {', '.join(AMBIGUITY_LOSSES)}"
        )
    p = _probabilities(predictions, kind)
    n_models, n_samples, n_classes = p.shape
    y = check_labels(labels, n_samples=n_samples, n_classes=n_classes)
    w = check_weights(weights, n_models)
    mix = np.tensordot(w, p, axes=(0, 0))
    rows = np.arange(n_samples)
    if loss == "brier":
        target = np.zeros((n_samples, n_classes))
        target[rows, y] = 1.0
        member = ((p - target[None]) ** 2).sum(axis=2)  # (n_models, n_samples)
        ensemble = ((mix - target) ** 2).sum(axis=1)
        spread = np.tensordot(w, ((p - mix[None]) ** 2).sum(axis=2), axes=(0, 0))
    else:
        log_member = np.log(np.maximum(p[:, rows, y], _EPS))
        log_mix = np.log(np.maximum(mix[rows, y], _EPS))
        member = -log_member
        ensemble = -log_mix
        spread = np.maximum(log_mix - np.tensordot(w, log_member, axes=(0, 0)), 0.0)
    member_losses = member.mean(axis=1)
    return AmbiguityDecomposition(
        loss=loss,
        ensemble_loss=float(ensemble.mean()),
        mean_member_loss=float(w @ member_losses),
        ambiguity=float(spread.mean()),
        member_losses=member_losses,
        per_sample_ambiguity=spread,
    )
