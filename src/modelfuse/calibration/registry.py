"""The one registry of calibration methods: name -> estimator class, and the saved form."""

from __future__ import annotations

from typing import Any

from modelfuse.calibration.base import Calibrator
from modelfuse.calibration.one_vs_rest import HistogramBinning, IsotonicCalibration, PlattScaling
from modelfuse.calibration.saved import saved_field, saved_mapping, shown
from modelfuse.calibration.scaling import MatrixScaling, TemperatureScaling, VectorScaling
from modelfuse.errors import ConfigError

__all__ = ["CALIBRATORS", "calibrator_from_json", "make_calibrator"]

CALIBRATORS: dict[str, type[Calibrator]] = {
    cls.method: cls
    for cls in (
        TemperatureScaling,
        VectorScaling,
        MatrixScaling,
        PlattScaling,
        IsotonicCalibration,
        HistogramBinning,
    )
}


def _lookup(name: object) -> type[Calibrator]:
    if name not in CALIBRATORS:
        raise ConfigError(
            f"calibration method: unknown {name!r}; expected one of {', '.join(CALIBRATORS)}"
        )
    return CALIBRATORS[name]  # type: ignore[index]


def make_calibrator(method: str, **params: Any) -> Calibrator:
    """An unfitted calibrator by registry name.

    Examples
    --------
    >>> make_calibrator("temperature", kind="probabilities")
    TemperatureScaling(kind='probabilities')
    """
    cls = _lookup(method)
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"calibration method {method!r}: {exc}") from None


def calibrator_from_json(saved: dict[str, Any]) -> Calibrator:
    """A fitted calibrator from its saved form (:meth:`Calibrator.to_json`), every value checked.

    Raises
    ------
    ConfigError
        An unknown method, or a missing, mistyped, misshapen or non-finite
        value; the message names the key.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    >>> cal = make_calibrator("temperature").fit(z, np.array([0, 1, 1, 1]))
    >>> calibrator_from_json(cal.to_json()).temperature_ == cal.temperature_
    True
    """
    saved = saved_mapping(saved, "calibrator")
    method = saved_field(saved, "method", "method")
    if not isinstance(method, str) or method not in CALIBRATORS:
        raise ConfigError(
            f'"method": unknown {shown(method)}; expected one of {", ".join(CALIBRATORS)}'
        )
    return CALIBRATORS[method].from_json(saved)
