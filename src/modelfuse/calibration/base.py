"""What every calibrator shares: input checks, ``predict``, and the saved (JSON) form."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from modelfuse.arrays import check_labels, check_predictions
from modelfuse.calibration.saved import (
    saved_choice,
    saved_field,
    saved_integer,
    saved_mapping,
    shown,
)
from modelfuse.errors import ConfigError, DataError

__all__ = [
    "MAX_CLASSES",
    "Calibrator",
    "check_bool_param",
    "check_calibration_set",
    "check_kind_param",
    "check_scores",
]

Kind = Literal["probabilities", "logits"]
# Classes a saved calibrator may declare; real files are checked against it.
MAX_CLASSES = 10_000_000


def check_scores(scores: np.ndarray, kind: Kind, *, source: str = "scores") -> np.ndarray:
    """Check scores of shape (n_samples, n_classes) with at least two classes.

    The checks of :func:`modelfuse.arrays.check_predictions` for ``kind``,
    and two or more columns (a binary score is given as two columns).

    Raises
    ------
    DataError
        A check fails; the message starts with ``source``.

    Examples
    --------
    >>> check_scores([[2.0, -1.0]], "logits").shape
    (1, 2)
    """
    s = check_predictions(scores, kind, source=source)
    if s.ndim != 2 or s.shape[1] < 2:
        raise DataError(
            f"{source}: expected shape (n_samples, n_classes) with n_classes >= 2, "
            f"got {s.shape}; for a binary score give two columns"
        )
    return s


def check_calibration_set(
    scores: np.ndarray,
    labels: np.ndarray,
    kind: Kind,
    *,
    scores_source: str = "scores",
    labels_source: str = "labels",
) -> tuple[np.ndarray, np.ndarray]:
    """Check scores (n_samples, n_classes) and labels for fitting a calibrator.

    Besides the checks of :func:`modelfuse.arrays.check_predictions` and
    :func:`~modelfuse.arrays.check_labels`, at least two classes must occur:
    a calibration set holding one class cannot tell a calibrated predictor
    from an overconfident one.

    Raises
    ------
    DataError
        Any of those checks fails.
    """
    s = check_scores(scores, kind, source=scores_source)
    y = check_labels(labels, n_samples=s.shape[0], n_classes=s.shape[1], source=labels_source)
    present = np.unique(y)
    if present.size < 2:
        raise DataError(
            f"{labels_source}: only class {int(present[0])} occurs in the calibration set; "
            "calibration needs samples of at least two classes"
        )
    return s, y


def check_kind_param(value: Any, key: str) -> Kind:
    """``value`` if it is ``"probabilities"`` or ``"logits"``, else a ConfigError naming ``key``."""
    return saved_choice(value, key, ("probabilities", "logits"))


def check_bool_param(value: Any, key: str) -> bool:
    """``value`` if it is ``True`` or ``False``, else a ConfigError naming ``key``."""
    if not isinstance(value, bool):
        raise ConfigError(f'"{key}": expected true or false, got {shown(value)}')
    return value


class Calibrator(BaseEstimator):
    """Base of the calibrators: ``fit(scores, labels)``, ``predict_proba(scores)``.

    Subclasses set :attr:`method` (their registry name), implement
    ``_fit(scores, labels)`` and ``_predict_proba(scores)`` on checked
    arrays, list a check for each ``__init__`` parameter in
    :attr:`_param_checks` (run by ``fit`` and on loading), list their fitted
    attributes in :attr:`_state_keys` so the saved form holds them, and
    implement ``_load_state(state)``, which checks and sets them from a
    saved form.
    """

    method: ClassVar[str]
    _state_keys: ClassVar[tuple[str, ...]]
    _param_checks: ClassVar[dict[str, Callable[[Any, str], Any]]] = {"kind": check_kind_param}

    # sklearn's BaseEstimator introspects __init__; every subclass defines ``kind``.
    kind: Kind

    def _check_params(self) -> None:
        for name, check in self._param_checks.items():
            check(getattr(self, name), name)

    def fit(self, scores: np.ndarray, labels: np.ndarray) -> Calibrator:
        """Fit on held-out ``scores`` (n_samples, n_classes) and integer ``labels``.

        Raises
        ------
        ConfigError
            A parameter is out of range.
        DataError
            The scores or labels fail a check of :func:`check_calibration_set`,
            or the fit gave non-finite values (scores too large to fit).
        """
        self._check_params()
        s, y = check_calibration_set(scores, labels, self.kind)
        self.n_classes_ = s.shape[1]
        self._fit(s.astype(np.float64), y)
        for key in self._state_keys:
            values = getattr(self, key)
            arrays = values if isinstance(values, list) else [values]
            if not all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in arrays):
                raise DataError(
                    f"{self.method} calibration: the fit gave non-finite values ({key}); "
                    "check the scores for extreme values"
                )
        return self

    def predict_proba(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, shape (n_samples, n_classes), rows summing to one."""
        check_is_fitted(self)
        s = check_predictions(scores, self.kind, source="scores")
        if s.ndim != 2 or s.shape[1] != self.n_classes_:
            raise DataError(
                f"scores: expected shape (n_samples, {self.n_classes_}) as in fit, got {s.shape}"
            )
        return self._predict_proba(s.astype(np.float64))

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """The class of largest calibrated probability."""
        return self.predict_proba(scores).argmax(axis=1)

    def to_json(self) -> dict[str, Any]:
        """The saved form: ``{"method", "params", "state"}`` with plain JSON values.

        Examples
        --------
        >>> import numpy as np
        >>> from modelfuse.calibration import TemperatureScaling
        >>> z = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
        >>> saved = TemperatureScaling().fit(z, np.array([0, 1, 1, 1])).to_json()
        >>> sorted(saved), sorted(saved["state"])
        (['method', 'params', 'state'], ['n_classes_', 'temperature_'])
        """
        check_is_fitted(self)
        state = {key: _to_plain(getattr(self, key)) for key in ("n_classes_", *self._state_keys)}
        params = {key: _to_plain(value) for key, value in self.get_params().items()}
        return {"method": self.method, "params": params, "state": state}

    @classmethod
    def from_json(cls, saved: Any) -> Calibrator:
        """Rebuild a fitted calibrator from :meth:`to_json`'s output, checking every value.

        ``params.kind`` is required; other parameters missing from ``params``
        take their defaults (they do not change the fitted map).

        Raises
        ------
        ConfigError
            A key is missing or unknown, or a value has the wrong type,
            range or shape, or is not finite; the message names the key.
        """
        saved = saved_mapping(saved, "calibrator")
        method = saved_field(saved, "method", "method")
        if method != cls.method:
            raise ConfigError(f'"method": expected {cls.method!r}, got {shown(method)}')
        params = saved_mapping(saved_field(saved, "params", "params"), "params")
        unknown = [name for name in params if name not in cls._param_checks]
        if unknown:
            raise ConfigError(
                f'"params.{str(unknown[0])[:40]}": unknown parameter of {cls.method}; '
                f"expected {', '.join(cls._param_checks)}"
            )
        saved_field(params, "kind", "params.kind")
        checked = {
            name: check(params[name], f"params.{name}")
            for name, check in cls._param_checks.items()
            if name in params
        }
        calibrator = cls(**checked)
        state = saved_mapping(saved_field(saved, "state", "state"), "state")
        calibrator.n_classes_ = saved_integer(
            saved_field(state, "n_classes_", "state.n_classes_"),
            "state.n_classes_",
            low=2,
            high=MAX_CLASSES,
        )
        calibrator._load_state(state)
        return calibrator

    def _load_state(self, state: Mapping[str, Any]) -> None:
        raise TypeError(f"{type(self).__name__} does not define _load_state")

    def _n_maps(self) -> int:
        """Binary maps of a one-vs-rest calibrator: one for two classes, else one per class."""
        return 1 if self.n_classes_ == 2 else self.n_classes_


def _to_plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"array": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
