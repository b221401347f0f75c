"""Two-tier ensembles: average inside groups of members, weight across groups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from modelfuse.ensemble.voting import (
    Kind,
    check_ensemble_predictions,
    check_weights,
    member_probabilities,
)
from modelfuse.ensemble.weights import learn_weights
from modelfuse.errors import ConfigError, DataError

__all__ = ["TwoTierResult", "two_tier_ensemble"]


@dataclass(frozen=True)
class TwoTierResult:
    """Probabilities of a two-tier ensemble and how they were formed.

    Attributes
    ----------
    probabilities : array of shape (n_samples, n_classes)
    groups : list
        The distinct group names, in order of first appearance.
    group_weights : array of shape (n_groups,)
        Weights across groups (summing to one).
    member_weights : array of shape (n_models,)
        The resulting weight of each member: its group's weight divided by
        the group's size.
    """

    probabilities: np.ndarray
    groups: list
    group_weights: np.ndarray
    member_weights: np.ndarray


def two_tier_ensemble(
    predictions: np.ndarray | Sequence[np.ndarray],
    groups: Sequence[object],
    *,
    kind: Kind,
    weights: np.ndarray | Sequence[float] | Literal["learned"] | None = None,
    labels: np.ndarray | None = None,
) -> TwoTierResult:
    """Average the members' probabilities inside each group, then weight the groups.

    Typical groups: checkpoints of one run, or fine-tunes of one base; the
    inner average removes noise within a group and the outer weights decide
    between groups.

    Parameters
    ----------
    predictions : array of shape (n_models, n_samples, n_classes) or a sequence
    groups : sequence of length n_models
        The group of each member (any hashable names).
    kind : {"probabilities", "logits"}
        Logits are softmaxed per member before averaging.
    weights : array of shape (n_groups,), "learned" or None
        Across-group weights in the order of :attr:`TwoTierResult.groups`;
        ``"learned"`` minimises the NLL on ``labels`` over the simplex
        (:func:`~modelfuse.ensemble.weights.learn_weights`); None is uniform
        over groups.
    labels : array of shape (n_samples,), optional
        Needed for ``weights="learned"``.

    Returns
    -------
    TwoTierResult

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]]])
    >>> two_tier_ensemble(p, ["a", "a", "b"], kind="probabilities").probabilities
    array([[0.5, 0.5]])
    """
    p = member_probabilities(check_ensemble_predictions(predictions, kind), kind)
    group_list = list(groups)
    if len(group_list) != p.shape[0]:
        raise DataError(f"groups: {len(group_list)} group names for {p.shape[0]} models")
    names = list(dict.fromkeys(group_list))
    index = np.array([names.index(g) for g in group_list])
    sizes = np.bincount(index, minlength=len(names))
    inner = np.stack([p[index == g].mean(axis=0) for g in range(len(names))])
    if isinstance(weights, str):
        if weights != "learned":
            raise ConfigError(f"weights: expected an array, 'learned' or None, got {weights!r}")
        if labels is None:
            raise ConfigError("labels: weights='learned' needs validation labels")
        group_weights = learn_weights(inner, labels, kind="probabilities")
    else:
        group_weights = check_weights(weights, len(names))
    probabilities = np.tensordot(group_weights.astype(inner.dtype), inner, axes=(0, 0))
    return TwoTierResult(
        probabilities=probabilities,
        groups=names,
        group_weights=group_weights,
        member_weights=group_weights[index] / sizes[index],
    )
