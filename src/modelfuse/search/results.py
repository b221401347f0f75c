"""The result every coefficient search returns: what was chosen, the merge, the trace."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Candidate", "SearchResult"]


@dataclass(frozen=True)
class Candidate:
    """One evaluated candidate of a search.

    Attributes
    ----------
    parameters : mapping
        What was tried (weights, ``lambda``, ``alpha``, ingredient indices...),
        in the search's own terms (see each search's ``Returns`` section).
    score : float
        Its score; higher is better.
    """

    parameters: Mapping[str, Any]
    score: float


@dataclass(frozen=True)
class SearchResult:
    """What a search chose, the merged weights, and every candidate it evaluated.

    Attributes
    ----------
    parameters : mapping
        The chosen parameters (the best candidate's, or the search's final state).
    state_dict : dict name -> Tensor
        The merged weights for ``parameters``; new tensors.
    score : float
        The score of ``state_dict``; higher is better.
    trace : tuple of Candidate
        Every candidate evaluated, in the order it was evaluated, for plots.

    Examples
    --------
    >>> r = SearchResult({"alpha": 0.5}, {}, 0.9, (Candidate({"alpha": 0.5}, 0.9),))
    >>> r.scores()
    [0.9]
    """

    parameters: Mapping[str, Any]
    state_dict: dict[str, torch.Tensor]
    score: float
    trace: tuple[Candidate, ...]

    def scores(self) -> list[float]:
        """The score of every candidate, in evaluation order."""
        return [c.score for c in self.trace]
