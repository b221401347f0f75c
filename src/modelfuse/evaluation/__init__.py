"""Honest evaluation: metrics with intervals, paired tests, rankings, nested CV.

Everything a fused model's claim to be better rests on:

- metrics with bootstrap intervals (:func:`bootstrap_metric`) and the paired
  bootstrap of a difference (:func:`paired_bootstrap`), whose p-value inverts
  its interval (:mod:`modelfuse.evaluation.intervals`: BCa where stable,
  percentile otherwise; :func:`interval_at_level`); ``groups=`` for a cluster
  bootstrap; .632 / .632+ estimates for scikit-learn estimators
  (:func:`bootstrap_632`);
- paired tests: :func:`mcnemar`, :func:`cochrans_q`, :func:`paired_5x2cv`
  and :func:`compare_estimators`, :func:`corrected_resampled_ttest`,
  :func:`paired_permutation_test`, :func:`metric_permutation_test`;
- many candidates: :func:`friedman_test`, :func:`nemenyi_critical_difference`,
  :func:`compare_to_reference` (Holm), :func:`wilcoxon_signed_rank`,
  :func:`mean_ranks`;
- selective prediction: :func:`risk_coverage_curve`, AURC and E-AURC for
  any :func:`confidence_scores`, with intervals by :func:`bootstrap_selective`;
- :func:`nested_cross_validation` for choosing hyperparameters honestly;
- :func:`compare_predictions`, the core of ``modelfuse compare`` (one row per
  distinct model, Holm-consistent intervals, :func:`resamples_for_family`,
  :func:`choose_reference`).
"""

from modelfuse.evaluation.bootstrap import (
    INTERVAL_METHODS,
    bca_interval,
    bootstrap_metric,
    group_codes,
    paired_bootstrap,
    percentile_interval,
    resample_sums,
)
from modelfuse.evaluation.bootstrap632 import ESTIMATORS_632, bootstrap_632
from modelfuse.evaluation.comparison import (
    COMPARISON_TESTS,
    CandidateComparison,
    Comparison,
    choose_reference,
    compare_predictions,
    resamples_for_family,
)
from modelfuse.evaluation.cv_tests import CV_SCHEMES, compare_estimators, paired_5x2cv
from modelfuse.evaluation.intervals import BCA_MIN_RESAMPLES, interval_at_level, min_resamples
from modelfuse.evaluation.metrics import (
    METRICS,
    MetricSpec,
    accuracy,
    auroc,
    balanced_accuracy,
    get_metric,
    macro_f1,
)
from modelfuse.evaluation.nested_cv import nested_cross_validate, nested_cross_validation
from modelfuse.evaluation.paired_tests import (
    EXACT_SIGN_FLIPS,
    MCNEMAR_METHODS,
    cochrans_q,
    corrected_resampled_ttest,
    mcnemar,
    mcnemar_from_counts,
    metric_permutation_test,
    paired_permutation_test,
)
from modelfuse.evaluation.ranking import (
    PAIRWISE_TESTS,
    compare_to_reference,
    friedman_test,
    holm,
    mean_ranks,
    nemenyi_critical_difference,
    rank_scores,
    wilcoxon_signed_rank,
)
from modelfuse.evaluation.results import (
    EstimateResult,
    FiveByTwoResult,
    FriedmanResult,
    IntervalResult,
    McNemarResult,
    NestedCVResult,
    TestResult,
)
from modelfuse.evaluation.selective import (
    CONFIDENCE_SCORES,
    SELECTIVE_METRICS,
    RiskCoverageCurve,
    aurc,
    bootstrap_selective,
    confidence_scores,
    e_aurc,
    entropy,
    risk_coverage_curve,
    risk_coverage_plot,
)

__all__ = [
    "BCA_MIN_RESAMPLES",
    "COMPARISON_TESTS",
    "CONFIDENCE_SCORES",
    "CV_SCHEMES",
    "ESTIMATORS_632",
    "EXACT_SIGN_FLIPS",
    "INTERVAL_METHODS",
    "MCNEMAR_METHODS",
    "METRICS",
    "PAIRWISE_TESTS",
    "SELECTIVE_METRICS",
    "CandidateComparison",
    "Comparison",
    "EstimateResult",
    "FiveByTwoResult",
    "FriedmanResult",
    "IntervalResult",
    "McNemarResult",
    "MetricSpec",
    "NestedCVResult",
    "RiskCoverageCurve",
    "TestResult",
    "accuracy",
    "aurc",
    "auroc",
    "balanced_accuracy",
    "bca_interval",
    "bootstrap_632",
    "bootstrap_metric",
    "bootstrap_selective",
    "choose_reference",
    "cochrans_q",
    "compare_estimators",
    "compare_predictions",
    "compare_to_reference",
    "confidence_scores",
    "corrected_resampled_ttest",
    "e_aurc",
    "entropy",
    "friedman_test",
    "get_metric",
    "group_codes",
    "holm",
    "interval_at_level",
    "macro_f1",
    "mcnemar",
    "mcnemar_from_counts",
    "mean_ranks",
    "min_resamples",
    "metric_permutation_test",
    "nemenyi_critical_difference",
    "nested_cross_validate",
    "nested_cross_validation",
    "paired_5x2cv",
    "paired_bootstrap",
    "paired_permutation_test",
    "percentile_interval",
    "rank_scores",
    "resample_sums",
    "resamples_for_family",
    "risk_coverage_curve",
    "risk_coverage_plot",
    "wilcoxon_signed_rank",
]
