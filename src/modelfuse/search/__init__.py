"""Choosing merge coefficients on data: soups, grid/random/evolutionary search, AdaMerging, DaWin.

A *score* is any callable ``score(state_dict) -> float``, higher is better
(see :mod:`modelfuse.search.scores` for accuracy and NLL of a classifier).
Every search returns a :class:`SearchResult`: the chosen parameters, the
merged weights and the trace of every candidate it scored.
"""

from modelfuse.search.adamerging import adamerging, prediction_entropy
from modelfuse.search.dawin import DaWinClassifier, dawin_lambdas
from modelfuse.search.evolution import evolutionary_search
from modelfuse.search.parameter_search import grid_search, merge_with_settings, random_search
from modelfuse.search.results import Candidate, SearchResult
from modelfuse.search.scores import Score, accuracy_score, model_outputs, nll_score
from modelfuse.search.soups import greedy_soup, uniform_soup
from modelfuse.search.wise_ft import wise_ft_sweep

__all__ = [
    "Candidate",
    "DaWinClassifier",
    "Score",
    "SearchResult",
    "accuracy_score",
    "adamerging",
    "dawin_lambdas",
    "evolutionary_search",
    "greedy_soup",
    "grid_search",
    "merge_with_settings",
    "model_outputs",
    "nll_score",
    "prediction_entropy",
    "random_search",
    "uniform_soup",
    "wise_ft_sweep",
]
