"""Array ensembles in a saved (JSON) form: fit on validation predictions, apply to new ones.

This is what ``modelfuse ensemble`` writes and ``--apply`` reads. The form is
a JSON object::

    {"format": "modelfuse-ensemble", "version": 1, "method": ..., "kind": ...,
     "n_models": M, "n_classes": K, "weights": [...] | null,
     "average": "probabilities" | "logits", "stacking": {...} | null,
     "options": {...}, "members": [NAME, ...]}

``stacking`` holds a multinomial (or, for two classes, binary) logistic
regression meta-learner as numbers: ``coef``, ``intercept``, ``classes``
and ``features``. ``members`` (optional) names the models in order; the
command line also records ``member_files`` and the ``validation`` table.
Only finite numbers are written, and :func:`check_saved_ensemble` checks
every value of a file before it is applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from modelfuse.arrays import check_labels
from modelfuse.calibration.base import MAX_CLASSES
from modelfuse.calibration.saved import (
    saved_array,
    saved_choice,
    saved_field,
    saved_integer,
    saved_mapping,
    shown,
)
from modelfuse.calibration.softmax import sigmoid, softmax
from modelfuse.ensemble.selection import caruana_selection
from modelfuse.ensemble.stacking import fit_stacking, stacking_features
from modelfuse.ensemble.voting import Kind, check_ensemble_predictions, check_weights, soft_vote
from modelfuse.ensemble.weights import learn_weights
from modelfuse.errors import ConfigError, DataError

__all__ = ["ENSEMBLE_METHODS", "apply_ensemble", "check_saved_ensemble", "fit_ensemble"]

FORMAT = "modelfuse-ensemble"
# Models a saved ensemble may declare; the files given are checked against it.
MAX_MODELS = 100_000


def _soft(p: np.ndarray, y: np.ndarray | None, kind: Kind, options: dict[str, Any]) -> dict:
    weights = check_weights(options.get("weights"), p.shape[0])
    return {"weights": weights.tolist(), "average": options.get("average", "probabilities")}


def _learned(p: np.ndarray, y: np.ndarray | None, kind: Kind, options: dict[str, Any]) -> dict:
    return {"weights": learn_weights(p, _need(y), kind=kind).tolist()}


def _caruana(p: np.ndarray, y: np.ndarray | None, kind: Kind, options: dict[str, Any]) -> dict:
    allowed = ("n_rounds", "metric", "n_init", "n_bags", "bag_fraction", "random_state")
    result = caruana_selection(
        p, _need(y), kind=kind, **{k: v for k, v in options.items() if k in allowed}
    )
    return {
        "weights": result.weights.tolist(),
        "selection": {
            "counts": result.counts.tolist(),
            "trajectory": result.trajectory.tolist(),
            "best_iteration": result.best_iteration,
            "loss": result.loss,
            "metric": result.metric,
            "gain": result.gain,
            "disagreement": result.disagreement,
            "mutual_information": result.mutual_information,
        },
    }


def _stacking(p: np.ndarray, y: np.ndarray | None, kind: Kind, options: dict[str, Any]) -> dict:
    features = options.get("features", "probabilities")
    y = _need(y)
    present = np.unique(y)
    if present.size < 2:
        raise DataError(
            f"labels: only class {int(present[0])} occurs; stacking fits a classifier on the "
            "labels and needs samples of at least two classes"
        )
    result = fit_stacking(
        p,
        y,
        kind=kind,
        meta_learner=LogisticRegression(max_iter=1000, C=float(options.get("C", 1.0))),
        features=features,
        cv=int(options.get("cv", 5)),
        random_state=options.get("random_state"),
    )
    meta = result.meta_learner
    return {
        "weights": None,
        "stacking": {
            "features": features,
            "coef": meta.coef_.tolist(),
            "intercept": meta.intercept_.tolist(),
            "classes": meta.classes_.tolist(),
        },
        "oof_probabilities": result.oof_probabilities,
    }


def _need(y: np.ndarray | None) -> np.ndarray:
    if y is None:
        raise ConfigError("labels: this ensemble method learns from validation labels; give them")
    return y


ENSEMBLE_METHODS: dict[str, Callable[..., dict]] = {
    "soft": _soft,
    "learned": _learned,
    "caruana": _caruana,
    "stacking": _stacking,
}


def fit_ensemble(
    predictions: np.ndarray,
    labels: np.ndarray | None,
    *,
    kind: Kind,
    method: str,
    members: Sequence[str] | None = None,
    **options: Any,
) -> tuple[dict[str, Any], np.ndarray]:
    """Fit an array ensemble and return its saved form and its validation probabilities.

    Parameters
    ----------
    predictions : array of shape (n_models, n_samples, n_classes), checked
    labels : array of shape (n_samples,), or None for ``method="soft"``
    kind : {"probabilities", "logits"}
    method : {"soft", "learned", "caruana", "stacking"}
    members : sequence of str, optional
        One name per model, stored as ``members`` (the command line stores
        the names of its ``--predictions``).
    **options
        ``soft``: ``weights``, ``average``; ``caruana``: the options of
        :func:`~modelfuse.ensemble.selection.caruana_selection`;
        ``stacking``: ``features``, ``cv``, ``C`` (inverse regularisation of
        the logistic meta-learner), ``random_state``.

    Returns
    -------
    saved : dict
        The JSON-ready saved form (finite numbers only).
    probabilities : array of shape (n_samples, n_classes)
        The ensemble's validation predictions; for stacking the
        meta-learner's out-of-fold predictions.

    Raises
    ------
    ConfigError
        An unknown method or option value.
    DataError
        Bad labels (one class only, for stacking), or a fit that gave
        non-finite values.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[[0.9, 0.1]], [[0.5, 0.5]]])
    >>> saved, probs = fit_ensemble(p, None, kind="probabilities", method="soft")
    >>> saved["weights"], probs
    ([0.5, 0.5], array([[0.7, 0.3]]))
    """
    if method not in ENSEMBLE_METHODS:
        raise ConfigError(
            f"method: unknown {method!r}; expected one of {', '.join(ENSEMBLE_METHODS)}"
        )
    n_models, n_samples, n_classes = predictions.shape
    if members is not None:
        members = [str(m) for m in members]
        if len(members) != n_models:
            raise ConfigError(f"members: {len(members)} names for {n_models} models")
    if labels is not None:
        labels = check_labels(labels, n_samples=n_samples, n_classes=n_classes)
    state = ENSEMBLE_METHODS[method](predictions, labels, kind, options)
    oof = state.pop("oof_probabilities", None)
    saved: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "method": method,
        "kind": kind,
        "n_models": n_models,
        "n_classes": n_classes,
        "weights": None,
        "average": "probabilities",
        "stacking": None,
        "options": {k: v for k, v in options.items() if v is not None and k != "weights"},
    }
    saved.update(state)
    if members is not None:
        saved["members"] = members
    fitted = [saved["weights"] or []]
    if saved["stacking"] is not None:
        fitted += [saved["stacking"]["coef"], saved["stacking"]["intercept"]]
    if not all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in fitted):
        raise DataError(
            f"{method} ensemble: the fit gave non-finite weights or coefficients; "
            "check the predictions for extreme values"
        )
    probabilities = oof if oof is not None else apply_ensemble(saved, predictions)
    return saved, probabilities


def check_saved_ensemble(saved: Any) -> dict[str, Any]:
    """Check every value of a saved ensemble; return it with its arrays as numbers.

    Required keys: ``format`` (``"modelfuse-ensemble"``), ``version`` (1),
    ``method``, ``kind``, ``n_models``, ``n_classes``, ``weights`` (one
    finite non-negative number per model with a positive sum; ``null`` for
    stacking), ``average`` and ``stacking`` (``null``, or for stacking
    ``features``, ``classes``, ``coef`` and ``intercept`` of matching
    shapes). ``members``, when present, names the models. Other keys
    (``options``, ``validation``, ``selection``) are informational.

    Raises
    ------
    ConfigError
        A key is missing, has the wrong type, range or shape, or holds NaN
        or infinity; the message names the key.

    Examples
    --------
    >>> check_saved_ensemble({"format": "modelfuse-ensemble", "version": 1})
    Traceback (most recent call last):
    ...
    modelfuse.errors.ConfigError: "method": missing
    """
    saved = saved_mapping(saved, "ensemble")
    if saved.get("format") != FORMAT:
        raise ConfigError(
            f'not a modelfuse ensemble (expected "format": "{FORMAT}", got '
            f"{shown(saved.get('format'))}); create one with `modelfuse ensemble ... -o ENSEMBLE.json`"
        )

    def field(name: str) -> Any:
        return saved_field(saved, name, name)

    saved_choice(field("version"), "version", (1,))
    method = saved_choice(field("method"), "method", tuple(ENSEMBLE_METHODS))
    kind = saved_choice(field("kind"), "kind", ("probabilities", "logits"))
    n_models = saved_integer(field("n_models"), "n_models", low=1, high=MAX_MODELS)
    n_classes = saved_integer(field("n_classes"), "n_classes", low=1, high=MAX_CLASSES)
    average = saved_choice(field("average"), "average", ("probabilities", "logits"))
    checked: dict[str, Any] = {
        **saved,
        "method": method,
        "kind": kind,
        "n_models": n_models,
        "n_classes": n_classes,
        "average": average,
    }
    if "members" in saved:
        members = saved["members"]
        if (
            not isinstance(members, list)
            or len(members) != n_models
            or not all(isinstance(m, str) for m in members)
        ):
            raise ConfigError(f'"members": expected a list of {n_models} names (strings)')
    weights, stacking = field("weights"), field("stacking")
    if method == "stacking":
        if weights is not None:
            raise ConfigError(f'"weights": expected null for stacking, got {shown(weights)}')
        checked["stacking"] = _check_saved_stacking(stacking, n_models, n_classes)
        return checked
    if stacking is not None:
        raise ConfigError(f'"stacking": expected null for method {method}, got {shown(stacking)}')
    w = saved_array(weights, "weights", shape=(n_models,), low=0.0)
    if w.sum() <= 0:
        raise ConfigError('"weights": expected a positive sum, got all zeros')
    checked["weights"] = w.tolist()
    return checked


def _check_saved_stacking(value: Any, n_models: int, n_classes: int) -> dict[str, Any]:
    stacking = saved_mapping(value, "stacking")
    features = saved_choice(
        saved_field(stacking, "features", "stacking.features"),
        "stacking.features",
        ("probabilities", "log_probabilities"),
    )
    classes = saved_array(
        saved_field(stacking, "classes", "stacking.classes"),
        "stacking.classes",
        shape=(None,),
        low=0,
        high=n_classes - 1,
    )
    if classes.size < 2 or np.any(classes != np.round(classes)) or np.any(np.diff(classes) <= 0):
        raise ConfigError(
            f'"stacking.classes": expected at least two increasing integers in [0, {n_classes})'
        )
    rows = 1 if classes.size == 2 else classes.size
    coef = saved_array(
        saved_field(stacking, "coef", "stacking.coef"),
        "stacking.coef",
        shape=(rows, n_models * n_classes),
    )
    intercept = saved_array(
        saved_field(stacking, "intercept", "stacking.intercept"),
        "stacking.intercept",
        shape=(rows,),
    )
    return {
        "features": features,
        "classes": classes.astype(np.int64).tolist(),
        "coef": coef.tolist(),
        "intercept": intercept.tolist(),
    }


def apply_ensemble(saved: dict[str, Any], predictions: np.ndarray | list) -> np.ndarray:
    """Apply a saved ensemble to new predictions (same members, same order, same kind).

    Parameters
    ----------
    saved : dict
        From :func:`fit_ensemble` (or its JSON file).
    predictions : array of shape (n_models, n_samples, n_classes)

    Returns
    -------
    array of shape (n_samples, n_classes)
        Probabilities.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[[0.9, 0.1]], [[0.5, 0.5]]])
    >>> saved, _ = fit_ensemble(p, None, kind="probabilities", method="soft", weights=[3, 1])
    >>> apply_ensemble(saved, p)
    array([[0.8, 0.2]])
    """
    saved = check_saved_ensemble(saved)
    kind = saved["kind"]
    p = check_ensemble_predictions(predictions, kind)
    if p.shape[0] != saved["n_models"] or p.shape[2] != saved["n_classes"]:
        raise DataError(
            f"predictions: the saved ensemble expects {saved['n_models']} models with "
            f"{saved['n_classes']} classes, got {p.shape[0]} models with {p.shape[2]} classes"
        )
    if saved["stacking"] is None:
        return soft_vote(p, kind=kind, weights=saved["weights"], average=saved["average"])
    meta = saved["stacking"]
    features = stacking_features(p, kind, meta["features"])
    coef = np.asarray(meta["coef"], dtype=np.float64)
    intercept = np.asarray(meta["intercept"], dtype=np.float64)
    classes = np.asarray(meta["classes"], dtype=np.int64)
    scores = features @ coef.T + intercept
    if coef.shape[0] == 1:  # binary logistic regression: one score for classes[1]
        positive = sigmoid(scores[:, 0])
        own = np.stack([1.0 - positive, positive], axis=1)
    else:
        own = softmax(scores)
    out = np.zeros((p.shape[1], saved["n_classes"]))
    out[:, classes] = own
    return out
