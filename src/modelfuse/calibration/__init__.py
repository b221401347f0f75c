"""Post-hoc calibration: calibrators, calibration metrics and reliability diagrams."""

from modelfuse.calibration.metrics import (
    adaptive_calibration_error,
    brier_score,
    calibration_bins,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)

__all__ = [
    "adaptive_calibration_error",
    "brier_score",
    "calibration_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "negative_log_likelihood",
]
