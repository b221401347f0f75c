"""Post-hoc calibration: calibrators, calibration metrics, reliability diagrams, conformal sets."""

from modelfuse.calibration.base import Calibrator, check_calibration_set
from modelfuse.calibration.conformal import (
    CONFORMAL_METHODS,
    ConformalClassifier,
    average_set_size,
    conformal_quantile,
    conformal_scores,
    empirical_coverage,
)
from modelfuse.calibration.cross_validation import (
    CrossValidatedMetrics,
    cross_validated_metrics,
)
from modelfuse.calibration.metrics import (
    adaptive_calibration_error,
    brier_score,
    calibration_bins,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)
from modelfuse.calibration.one_vs_rest import HistogramBinning, IsotonicCalibration, PlattScaling
from modelfuse.calibration.registry import CALIBRATORS, calibrator_from_json, make_calibrator
from modelfuse.calibration.reliability import reliability_diagram
from modelfuse.calibration.scaling import MatrixScaling, TemperatureScaling, VectorScaling

__all__ = [
    "CALIBRATORS",
    "CONFORMAL_METHODS",
    "Calibrator",
    "ConformalClassifier",
    "CrossValidatedMetrics",
    "HistogramBinning",
    "IsotonicCalibration",
    "MatrixScaling",
    "PlattScaling",
    "TemperatureScaling",
    "VectorScaling",
    "adaptive_calibration_error",
    "average_set_size",
    "brier_score",
    "calibration_bins",
    "calibrator_from_json",
    "check_calibration_set",
    "conformal_quantile",
    "conformal_scores",
    "cross_validated_metrics",
    "empirical_coverage",
    "expected_calibration_error",
    "make_calibrator",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "reliability_diagram",
]
