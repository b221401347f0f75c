"""What every calibrator shares: input checks, ``predict``, and the saved (JSON) form."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from modelfuse.arrays import check_labels, check_predictions
from modelfuse.errors import ConfigError, DataError

__all__ = ["Calibrator", "check_calibration_set", "check_scores"]

Kind = Literal["probabilities", "logits"]


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


class Calibrator(BaseEstimator):
    """Base of the calibrators: ``fit(scores, labels)``, ``predict_proba(scores)``.

    Subclasses set :attr:`method` (their registry name), implement
    ``_fit(scores, labels)`` and ``_predict_proba(scores)`` on checked
    arrays, and list their fitted attributes in :attr:`_state_keys` so the
    saved form can hold them.
    """

    method: ClassVar[str]
    _state_keys: ClassVar[tuple[str, ...]]

    # sklearn's BaseEstimator introspects __init__; every subclass defines ``kind``.
    kind: Kind

    def fit(self, scores: np.ndarray, labels: np.ndarray) -> Calibrator:
        """Fit on held-out ``scores`` (n_samples, n_classes) and integer ``labels``."""
        s, y = check_calibration_set(scores, labels, self.kind)
        self.n_classes_ = s.shape[1]
        self._fit(s.astype(np.float64), y)
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
        >>> sorted(saved)
        ['method', 'params', 'state']
        """
        check_is_fitted(self)
        state = {key: _to_plain(getattr(self, key)) for key in ("n_classes_", *self._state_keys)}
        params = {key: _to_plain(value) for key, value in self.get_params().items()}
        return {"method": self.method, "params": params, "state": state}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> Calibrator:
        """Rebuild a fitted calibrator from :meth:`to_json`'s output."""
        if not isinstance(saved, dict) or saved.get("method") != cls.method:
            got = saved.get("method") if isinstance(saved, dict) else type(saved).__name__
            raise ConfigError(f"saved calibrator: expected method {cls.method!r}, got {got!r}")
        try:
            calibrator = cls(**saved["params"])
            state = saved["state"]
            calibrator.n_classes_ = int(state["n_classes_"])
            for key in cls._state_keys:
                setattr(calibrator, key, _from_plain(state[key]))
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"saved calibrator {cls.method!r}: missing or unexpected field ({exc}); "
                "re-create it with `modelfuse calibrate`"
            ) from None
        return calibrator


def _to_plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"array": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_plain(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"array", "dtype"}:
        return np.asarray(value["array"], dtype=value["dtype"])
    if isinstance(value, list):
        return [_from_plain(v) for v in value]
    return value
