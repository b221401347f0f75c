"""Diversity beside the gain: what an ensemble's members disagree on and what it buys.

For an ensemble's members on one labelled split: their mean pairwise
disagreement, the mean mutual information between the prediction and the
member (epistemic uncertainty), and the ambiguity decomposition of the
ensemble's NLL and Brier score (ensemble loss = the members' weighted mean
loss minus the ambiguity), next to the ensemble's gain over its best member
on the same split (:mod:`modelfuse.ensemble.diversity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DiversityRow", "diversity_row"]


@dataclass(frozen=True)
class DiversityRow:
    """One ensemble's diversity and gain on one split.

    Attributes
    ----------
    ensemble, split : str
    members : tuple of str
        The members with a positive weight.
    disagreement : float
        Mean over pairs of members of the share of samples whose top classes differ.
    mutual_information : float
        Mean over samples of the mutual information (nats), under the ensemble's weights.
    nll, brier : dict
        ``"ensemble"``, ``"mean_member"`` (weighted), ``"ambiguity"``, ``"best_member"``
        (the lowest member loss on this split) and ``"gain"`` (best member minus ensemble).
    best_member : dict
        ``"nll"`` and ``"brier"`` to the name of the member with the lowest loss on this split.
    """

    ensemble: str
    split: str
    members: tuple[str, ...]
    disagreement: float
    mutual_information: float
    nll: dict[str, float]
    brier: dict[str, float]
    best_member: dict[str, str]


def diversity_row(
    ensemble: str,
    split: str,
    names: Sequence[str],
    member_log_probs: Sequence[np.ndarray],
    labels: np.ndarray,
    weights: Sequence[float] | np.ndarray | None = None,
) -> DiversityRow:
    """The diversity and gain of the ensemble of ``member_log_probs`` (weights ``weights``,
    uniform when omitted; members of weight 0 are left out) on ``labels``.

    Examples
    --------
    >>> a = np.log([[0.8, 0.2], [0.6, 0.4]]); b = np.log([[0.4, 0.6], [0.7, 0.3]])
    >>> row = diversity_row("vote", "test", ["a", "b"], [a, b], np.array([0, 0]))
    >>> row.disagreement, round(row.nll["ensemble"] + row.nll["ambiguity"], 6) == round(
    ...     row.nll["mean_member"], 6)
    (0.5, True)
    """
    from modelfuse.ensemble.diversity import (
        ambiguity_decomposition,
        pairwise_diversity,
        uncertainty_decomposition,
    )

    w = np.ones(len(names)) if weights is None else np.asarray(weights, dtype=np.float64)
    keep = np.flatnonzero(w > 0)
    kept_names = tuple(names[i] for i in keep)
    p = np.stack([member_log_probs[i] for i in keep])
    w = w[keep] / w[keep].sum()
    diversity = pairwise_diversity(p, kind="logits")
    uncertainty = uncertainty_decomposition(p, kind="logits", weights=w)
    losses = {}
    best = {}
    for loss in ("nll", "brier"):
        d = ambiguity_decomposition(p, labels, kind="logits", loss=loss, weights=w)
        i = int(np.argmin(d.member_losses))
        best[loss] = kept_names[i]
        losses[loss] = {
            "ensemble": d.ensemble_loss,
            "mean_member": d.mean_member_loss,
            "ambiguity": d.ambiguity,
            "best_member": float(d.member_losses[i]),
            "gain": float(d.member_losses[i] - d.ensemble_loss),
        }
    return DiversityRow(
        ensemble=ensemble,
        split=split,
        members=kept_names,
        disagreement=diversity.mean_disagreement,
        mutual_information=uncertainty.mean_epistemic,
        nll=losses["nll"],
        brier=losses["brier"],
        best_member=best,
    )
