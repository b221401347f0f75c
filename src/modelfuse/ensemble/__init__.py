"""Prediction-space ensembles on arrays (n_models, n_samples, n_classes) and fitted models."""

from modelfuse.ensemble.cascade import CascadeResult, early_exit_cascade
from modelfuse.ensemble.diversity import (
    AMBIGUITY_LOSSES,
    AmbiguityDecomposition,
    PairwiseDiversity,
    UncertaintyDecomposition,
    ambiguity_decomposition,
    pairwise_diversity,
    uncertainty_decomposition,
)
from modelfuse.ensemble.quantile import QuantileEnsemble, combine_quantiles, conformal_margin
from modelfuse.ensemble.saved import (
    ENSEMBLE_METHODS,
    apply_ensemble,
    check_saved_ensemble,
    fit_ensemble,
)
from modelfuse.ensemble.selection import SelectionResult, caruana_selection
from modelfuse.ensemble.stacking import (
    StackingResult,
    fit_stacking,
    out_of_fold_predictions,
    stacking_features,
)
from modelfuse.ensemble.two_tier import TwoTierResult, two_tier_ensemble
from modelfuse.ensemble.voting import check_ensemble_predictions, soft_vote
from modelfuse.ensemble.weights import learn_weights
from modelfuse.ensemble.wrappers import SelectionEnsemble, StackingEnsemble, VotingEnsemble

__all__ = [
    "AMBIGUITY_LOSSES",
    "ENSEMBLE_METHODS",
    "AmbiguityDecomposition",
    "CascadeResult",
    "PairwiseDiversity",
    "QuantileEnsemble",
    "SelectionEnsemble",
    "SelectionResult",
    "StackingEnsemble",
    "StackingResult",
    "TwoTierResult",
    "UncertaintyDecomposition",
    "VotingEnsemble",
    "ambiguity_decomposition",
    "apply_ensemble",
    "caruana_selection",
    "check_ensemble_predictions",
    "check_saved_ensemble",
    "combine_quantiles",
    "conformal_margin",
    "early_exit_cascade",
    "fit_ensemble",
    "fit_stacking",
    "learn_weights",
    "out_of_fold_predictions",
    "pairwise_diversity",
    "soft_vote",
    "stacking_features",
    "two_tier_ensemble",
    "uncertainty_decomposition",
]
