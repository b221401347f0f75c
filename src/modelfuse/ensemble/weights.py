"""Soft-voting weights learned by minimising validation NLL on the simplex."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize

from modelfuse.arrays import check_labels
from modelfuse.calibration.softmax import softmax
from modelfuse.ensemble.voting import Kind, check_ensemble_predictions, member_probabilities

__all__ = ["learn_weights", "true_class_probabilities"]


def true_class_probabilities(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``p_m[i, labels[i]]`` for every member, shape (n_models, n_samples), float64.

    Examples
    --------
    >>> import numpy as np
    >>> true_class_probabilities(np.array([[[0.2, 0.8], [0.6, 0.4]]]), np.array([1, 0]))
    array([[0.8, 0.6]])
    """
    n = probabilities.shape[1]
    return probabilities[:, np.arange(n), labels].astype(np.float64)


def learn_weights(
    predictions: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    kind: Kind,
    max_iter: int = 1000,
    eps: float = 1e-12,
) -> np.ndarray:
    """Weights ``w`` on the simplex minimising the NLL of ``sum_m w_m p_m`` on validation data.

    The simplex is parametrised by a softmax, ``w = softmax(a)``, and ``a``
    is found by L-BFGS (``scipy.optimize.minimize(method="L-BFGS-B")``) from
    the uniform start with the analytic gradient
    ``dNLL/dw_m = -mean_i p_m[i, y_i] / p[i, y_i]``. Only the true-class
    probabilities enter, so each step costs O(n_models * n_samples). The
    objective is convex in ``w``; a weight the data do not want tends to 0
    (the parametrisation never reaches exactly 0).

    Parameters
    ----------
    predictions : array of shape (n_models, n_samples, n_classes) or a sequence
    labels : array of shape (n_samples,)
    kind : {"probabilities", "logits"}
        Logits are softmaxed per member first (probabilities are averaged).
    max_iter : int, default 1000
    eps : float, default 1e-12
        Lower clip on the ensemble's true-class probability.

    Returns
    -------
    array of shape (n_models,)
        Non-negative, summing to one.

    References
    ----------
    Caruana, Niculescu-Mizil, Crew, Ksikes. Ensemble selection from libraries
    of models. ICML 2004 (Section 2, on fitting weights directly).

    Examples
    --------
    >>> import numpy as np
    >>> good = np.array([[0.9, 0.1], [0.1, 0.9]]); bad = np.array([[0.1, 0.9], [0.9, 0.1]])
    >>> w = learn_weights([good, bad], np.array([0, 1]), kind="probabilities")
    >>> bool(w[0] > 0.99)
    True
    """
    p = member_probabilities(check_ensemble_predictions(predictions, kind), kind)
    y = check_labels(labels, n_samples=p.shape[1], n_classes=p.shape[2])
    t = true_class_probabilities(p, y)  # (M, n)
    m, n = t.shape

    def loss_and_grad(a: np.ndarray) -> tuple[float, np.ndarray]:
        w = softmax(a)
        mix = np.maximum(w @ t, eps)
        loss = float(-np.log(mix).mean())
        g = -(t / mix).mean(axis=1)  # d loss / d w
        return loss, w * (g - w @ g)  # chain rule through the softmax

    result = minimize(
        loss_and_grad, np.zeros(m), jac=True, method="L-BFGS-B", options={"maxiter": max_iter}
    )
    return softmax(result.x)
