"""DaWin: per-sample interpolation of two endpoint models, weighted by their entropies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.mixture import GaussianMixture
from sklearn.utils.validation import check_is_fitted
from torch import nn
from torch.func import functional_call, vmap

from modelfuse.errors import ConfigError, DataError
from modelfuse.merge.state_dict import merge_state_dicts
from modelfuse.search._state import check_matching, check_model_keys, is_float
from modelfuse.search.scores import model_outputs

__all__ = ["DaWinClassifier", "dawin_lambdas"]

Mode = Literal["sample", "cluster"]
_MODES = ("sample", "cluster")


def _entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = torch.log_softmax(logits.to(torch.float64) / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def dawin_lambdas(
    zero_shot_logits: torch.Tensor, fine_tuned_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """DaWin's interpolation coefficient of every sample from the two endpoints' logits.

    With :math:`H` the entropy of :math:`\\mathrm{softmax}(z / T)`,
    :math:`\\lambda(x) = e^{-H_{ft}} / (e^{-H_{zs}} + e^{-H_{ft}})`, computed
    as :math:`\\sigma(H_{zs} - H_{ft})` (the same value, without overflow).
    The more confident the fine-tuned model is relative to the zero-shot
    one, the closer :math:`\\lambda` is to 1.

    Parameters
    ----------
    zero_shot_logits, fine_tuned_logits : Tensor of shape (n_samples, n_classes)
        Each endpoint's logits for the same samples.
    temperature : float, default 1.0
        :math:`T > 0`.

    Returns
    -------
    Tensor of shape (n_samples,)
        float64, in (0, 1).

    Examples
    --------
    >>> zs = torch.zeros(1, 2)                 # uniform: H = log 2
    >>> ft = torch.tensor([[100.0, 0.0]])      # certain: H = 0
    >>> dawin_lambdas(zs, ft)                  # 1 / (1/2 + 1) = 2/3
    tensor([0.6667], dtype=torch.float64)
    """
    if not temperature > 0:
        raise ConfigError(f"temperature: expected a positive number, got {temperature!r}")
    if zero_shot_logits.shape != fine_tuned_logits.shape or zero_shot_logits.ndim != 2:
        raise DataError(
            "logits: expected two arrays of one shape (n_samples, n_classes), got "
            f"{tuple(zero_shot_logits.shape)} and {tuple(fine_tuned_logits.shape)}"
        )
    h_zs = _entropy(zero_shot_logits, temperature)
    h_ft = _entropy(fine_tuned_logits, temperature)
    return torch.sigmoid(h_zs - h_ft)


class DaWinClassifier(ClassifierMixin, BaseEstimator):
    """Dynamic weight interpolation: each input gets its own mix of two endpoint models.

    For an input :math:`x` both endpoints are run; :math:`\\lambda(x)` comes
    from their prediction entropies (:func:`dawin_lambdas`) and the
    prediction is that of :math:`\\theta(x) = (1 - \\lambda(x))\\theta_{zs} +
    \\lambda(x)\\theta_{ft}`. Training-free; labels are never used.

    ``mode="sample"`` runs one merged model per sample (vectorised with
    :func:`torch.func.vmap` over chunks of ``batch_size`` samples; memory
    grows with ``batch_size`` times the model size). ``mode="cluster"`` is
    the cheaper path: ``fit(X)`` fits a Gaussian mixture of ``n_clusters``
    components to the coefficients of ``X``, merges once per component at
    its mean coefficient, and prediction routes every sample to the merged
    model of its most likely component.

    Parameters
    ----------
    model : nn.Module
        The architecture, mapping a batch of inputs to logits. Its own
        weights are not used; it runs in eval mode and its training flag is
        restored.
    zero_shot, fine_tuned : mapping name -> Tensor
        The two endpoints' ``state_dict()``. Not modified.
    temperature : float, default 1.0
        Softmax temperature of the entropies.
    mode : {"sample", "cluster"}, default "sample"
        Per-sample merging, or one merge per mixture component.
    n_clusters : int, default 3
        Mixture components (``mode="cluster"``).
    batch_size : int, default 64
        Samples merged and run at once (``mode="sample"``).
    random_state : int, default 0
        Seed of the Gaussian mixture.

    Attributes
    ----------
    zero_shot_, delta_ : dict name -> Tensor
        :math:`\\theta_{zs}` and :math:`\\theta_{ft} - \\theta_{zs}` (float32)
        for floating-point tensors.
    mixture_ : sklearn.mixture.GaussianMixture
        The mixture over coefficients (``mode="cluster"``).
    cluster_lambdas_ : ndarray of shape (n_clusters,)
        Each component's mean coefficient, clipped to [0, 1] (``mode="cluster"``).
    cluster_state_dicts_ : list of dict name -> Tensor
        The merged model of each component (``mode="cluster"``).

    References
    ----------
    Oh et al., "DaWin: training-free dynamic weight interpolation for robust
    adaptation", ICLR 2025.

    Examples
    --------
    >>> _ = torch.manual_seed(0); m = torch.nn.Linear(4, 3)
    >>> zs = {k: v.clone() for k, v in m.state_dict().items()}
    >>> ft = {k: v + torch.randn_like(v) for k, v in zs.items()}
    >>> x = torch.randn(10, 4)
    >>> clf = DaWinClassifier(m, zs, ft).fit()
    >>> clf.predict_proba(x).shape, bool(((clf.lambdas(x) > 0) & (clf.lambdas(x) < 1)).all())
    (torch.Size([10, 3]), True)
    """

    def __init__(
        self,
        model: nn.Module,
        zero_shot: Mapping[str, torch.Tensor],
        fine_tuned: Mapping[str, torch.Tensor],
        *,
        temperature: float = 1.0,
        mode: Mode = "sample",
        n_clusters: int = 3,
        batch_size: int = 64,
        random_state: int = 0,
    ) -> None:
        self.model = model
        self.zero_shot = zero_shot
        self.fine_tuned = fine_tuned
        self.temperature = temperature
        self.mode = mode
        self.n_clusters = n_clusters
        self.batch_size = batch_size
        self.random_state = random_state

    def _check_settings(self) -> None:
        if self.mode not in _MODES:
            raise ConfigError(f"mode: expected one of {', '.join(_MODES)}, got {self.mode!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: expected a positive number, got {self.temperature!r}")
        for name in ("n_clusters", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")

    def fit(self, X: torch.Tensor | None = None, y: object = None) -> DaWinClassifier:
        """Check the endpoints and, for ``mode="cluster"``, fit the mixture on ``X``.

        Parameters
        ----------
        X : Tensor, optional
            Unlabeled inputs; required for ``mode="cluster"``, unused otherwise.
        y : ignored

        Returns
        -------
        self
        """
        self._check_settings()
        check_matching([self.zero_shot, self.fine_tuned], where="[zero_shot, fine_tuned]")
        check_model_keys(self.model, self.zero_shot, "zero_shot")
        zero_shot = {
            k: v.detach().to(torch.float32) for k, v in self.zero_shot.items() if is_float(v)
        }
        self.delta_ = {
            k: self.fine_tuned[k].detach().to(torch.float32) - v for k, v in zero_shot.items()
        }
        self.zero_shot_ = zero_shot
        if self.mode == "sample":
            return self
        if not isinstance(X, torch.Tensor):
            raise DataError(
                "X: mode='cluster' fits a mixture over the coefficients of unlabeled inputs; "
                f"pass a tensor of inputs to fit, got {type(X).__name__}"
            )
        if X.shape[0] < self.n_clusters:
            raise DataError(
                f"X: {X.shape[0]} samples for n_clusters={self.n_clusters}; give at least one "
                "sample per cluster or lower n_clusters"
            )
        lam = self._lambdas(X).numpy().reshape(-1, 1)
        mixture = GaussianMixture(self.n_clusters, random_state=self.random_state).fit(lam)
        self.mixture_ = mixture
        self.cluster_lambdas_ = np.clip(mixture.means_.ravel(), 0.0, 1.0)
        self.cluster_state_dicts_ = [
            merge_state_dicts(
                "linear", [self.zero_shot, self.fine_tuned], weights=[1.0 - float(c), float(c)]
            )
            for c in self.cluster_lambdas_
        ]
        return self

    def _lambdas(self, X: torch.Tensor) -> torch.Tensor:
        zs = model_outputs(self.model, self.zero_shot, X)
        ft = model_outputs(self.model, self.fine_tuned, X)
        return dawin_lambdas(zs, ft, self.temperature)

    def lambdas(self, X: torch.Tensor) -> torch.Tensor:
        """The per-sample coefficient :math:`\\lambda(x)`, float64 of shape (n_samples,)."""
        check_is_fitted(self, "delta_")
        return self._lambdas(X)

    def clusters(self, X: torch.Tensor) -> np.ndarray:
        """The mixture component each sample is routed to (``mode="cluster"``)."""
        check_is_fitted(self, "mixture_")
        return self.mixture_.predict(self._lambdas(X).numpy().reshape(-1, 1))

    def _logits_per_sample(self, X: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        fixed = {k: v.detach() for k, v in self.zero_shot.items() if not is_float(v)}
        in_dims = {k: (None if k in fixed else 0) for k in self.zero_shot}

        def one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, params, (x.unsqueeze(0),)).squeeze(0)

        batched = vmap(one, in_dims=(in_dims, 0))
        out = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, X.shape[0], self.batch_size):
                    chunk = lam[start : start + self.batch_size].to(torch.float32)
                    params = {}
                    for k in self.zero_shot:  # the order of in_dims
                        if k in fixed:
                            params[k] = fixed[k]
                            continue
                        base = self.zero_shot_[k]
                        c = chunk.reshape((-1,) + (1,) * base.ndim)
                        merged = base.unsqueeze(0) + c * self.delta_[k].unsqueeze(0)
                        params[k] = merged.to(self.zero_shot[k].dtype)
                    out.append(batched(params, X[start : start + self.batch_size]))
        finally:
            self.model.train(was_training)
        return torch.cat(out)

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """Logits of each sample's interpolated model, shape (n_samples, n_classes)."""
        check_is_fitted(self, "delta_")
        if not isinstance(X, torch.Tensor) or X.ndim < 1 or X.shape[0] == 0:
            raise DataError("X: expected a non-empty tensor of inputs, one sample per row")
        if self.mode == "sample":
            return self._logits_per_sample(X, self._lambdas(X))
        check_is_fitted(self, "mixture_")
        assignment = torch.from_numpy(self.clusters(X))
        logits: torch.Tensor | None = None
        for c, state_dict in enumerate(self.cluster_state_dicts_):
            index = torch.nonzero(assignment == c).ravel()
            if index.numel() == 0:
                continue
            part = model_outputs(self.model, state_dict, X[index])
            if logits is None:
                logits = part.new_empty((X.shape[0],) + tuple(part.shape[1:]))
            logits[index] = part
        return logits

    def predict_proba(self, X: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``softmax(logits)`` (temperature 1), shape (n_samples, n_classes)."""
        return torch.softmax(self.decision_function(X).float(), dim=-1)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """The most probable class of each sample."""
        return self.decision_function(X).argmax(dim=-1)
