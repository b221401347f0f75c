"""Array ensembles in a saved (JSON) form: fit on validation predictions, apply to new ones.

This is what ``modelfuse ensemble`` writes and ``--apply`` reads. The form is
a JSON object::

    {"format": "modelfuse-ensemble", "version": 1, "method": ..., "kind": ...,
     "n_models": M, "n_classes": K, "weights": [...] | null,
     "average": "probabilities" | "logits", "stacking": {...} | null,
     "options": {...}}

``stacking`` holds a multinomial (or, for two classes, binary) logistic
regression meta-learner as numbers: ``coef``, ``intercept``, ``classes``
and ``features``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from modelfuse.arrays import check_labels
from modelfuse.calibration.softmax import sigmoid, softmax
from modelfuse.ensemble.selection import caruana_selection
from modelfuse.ensemble.stacking import fit_stacking, stacking_features
from modelfuse.ensemble.voting import Kind, check_ensemble_predictions, check_weights, soft_vote
from modelfuse.ensemble.weights import learn_weights
from modelfuse.errors import ConfigError, DataError

__all__ = ["ENSEMBLE_METHODS", "apply_ensemble", "check_saved_ensemble", "fit_ensemble"]

FORMAT = "modelfuse-ensemble"


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
        },
    }


def _stacking(p: np.ndarray, y: np.ndarray | None, kind: Kind, options: dict[str, Any]) -> dict:
    features = options.get("features", "probabilities")
    result = fit_stacking(
        p,
        _need(y),
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
    **options: Any,
) -> tuple[dict[str, Any], np.ndarray]:
    """Fit an array ensemble and return its saved form and its validation probabilities.

    Parameters
    ----------
    predictions : array of shape (n_models, n_samples, n_classes), checked
    labels : array of shape (n_samples,), or None for ``method="soft"``
    kind : {"probabilities", "logits"}
    method : {"soft", "learned", "caruana", "stacking"}
    **options
        ``soft``: ``weights``, ``average``; ``caruana``: the options of
        :func:`~modelfuse.ensemble.selection.caruana_selection`;
        ``stacking``: ``features``, ``cv``, ``C`` (inverse regularisation of
        the logistic meta-learner), ``random_state``.

    Returns
    -------
    saved : dict
        The JSON-ready saved form.
    probabilities : array of shape (n_samples, n_classes)
        The ensemble's validation predictions; for stacking the
        meta-learner's out-of-fold predictions.

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
    probabilities = oof if oof is not None else apply_ensemble(saved, predictions)
    return saved, probabilities


def check_saved_ensemble(saved: Any) -> dict[str, Any]:
    """Check that ``saved`` is a saved ensemble of a known method; return it."""
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ConfigError(
            f'saved ensemble: not a modelfuse ensemble (expected "format": "{FORMAT}"); '
            "create one with `modelfuse ensemble ... -o ENSEMBLE.json`"
        )
    if saved.get("method") not in ENSEMBLE_METHODS:
        raise ConfigError(f"saved ensemble: unknown method {saved.get('method')!r}")
    return saved


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
