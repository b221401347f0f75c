"""Local, global or between, per client: which model serves each client best.

For every client, on that client's own held-out split: its local model, the
global model, the WiSE-FT interpolation between them (alpha chosen on the
client's validation split) and the FedLabel per-sample selection between
local and global by confidence, with paired bootstrap intervals against the
local model and Holm-adjusted p-values. No Flower needed: plain torch models
and arrays in, so checkpoints from any federated framework work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from modelfuse.errors import ConfigError, DataError
from modelfuse.evaluation.results import IntervalResult

__all__ = [
    "CANDIDATES",
    "ClientComparison",
    "ClientSplit",
    "PersonalizationResult",
    "Personalizer",
    "fedlabel_select",
]

CANDIDATES: tuple[str, ...] = ("local", "global", "interpolated", "selected")
"""The four predictors compared for every client, in table order."""

_METRICS: tuple[str, ...] = ("accuracy", "nll", "ece")


@dataclass(frozen=True)
class ClientSplit:
    """One client's local model and its own validation and test data.

    Attributes
    ----------
    name : str
    local_state : mapping name -> Tensor
        The client's local (personal) model; the same keys as the global one.
    x_val, y_val : Tensor
        The validation split: chooses alpha and fits the calibrator.
    x_test, y_test : Tensor
        The held-out split every reported number is measured on.
    """

    name: str
    local_state: Mapping[str, torch.Tensor]
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class ClientComparison:
    """One client's scores, and each candidate's paired difference to the local model.

    Attributes
    ----------
    name : str
    alpha : float
        The chosen weight of the local model in the interpolation.
    scores : dict
        ``scores[candidate][metric]`` on the test split.
    differences : dict
        ``differences[candidate][metric]``: an :class:`IntervalResult` of
        ``metric(candidate) - metric(local)`` (candidates other than local).
    adjusted_pvalues : dict
        ``adjusted_pvalues[candidate][metric]``: Holm-adjusted over every
        client and candidate of that metric.
    """

    name: str
    alpha: float
    scores: dict[str, dict[str, float]]
    differences: dict[str, dict[str, IntervalResult]]
    adjusted_pvalues: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class PersonalizationResult:
    """What :meth:`Personalizer.fit` found, client by client.

    Attributes
    ----------
    clients : list of ClientComparison
    level : float
        The significance level of the gain/loss counts.
    gains, losses : list of str
        Clients whose accuracy the global model raises / lowers against the
        local one (Holm-adjusted p below ``level``).
    """

    clients: list[ClientComparison]
    level: float
    gains: list[str]
    losses: list[str]

    def table(
        self, *, metric: str = "accuracy", style: Literal["markdown", "text"] = "markdown"
    ) -> str:
        """The per-client table of one metric (through :mod:`modelfuse.report`)."""
        from modelfuse.report.table import format_number, format_pvalue, format_table

        if metric not in _METRICS:
            raise ConfigError(
                f"metric: expected one of {', '.join(_METRICS)}, got {repr(metric)[:60]}"
            )
        headers = ["client", "alpha", *CANDIDATES, "global - local", "p (Holm)"]
        rows = []
        for c in self.clients:
            diff = c.differences["global"][metric]
            rows.append(
                [
                    c.name,
                    f"{c.alpha:.2f}",
                    *(format_number(c.scores[k][metric], "metric") for k in CANDIDATES),
                    f"{format_number(diff.statistic, 'difference')} "
                    f"[{format_number(diff.ci[0], 'difference')}, "
                    f"{format_number(diff.ci[1], 'difference')}]",
                    format_pvalue(c.adjusted_pvalues["global"][metric]),
                ]
            )
        return format_table(headers, rows, style=style)

    def plot(self, path: str | Path, *, metric: str = "accuracy") -> Path:
        """A forest plot of ``metric(global) - metric(local)`` per client, with intervals."""
        from modelfuse.report.plots import forest_plot

        diffs = [c.differences["global"][metric] for c in self.clients]
        return forest_plot(
            [c.name for c in self.clients],
            [d.statistic for d in diffs],
            [d.ci for d in diffs],
            path,
            reference_value=0.0,
            xlabel=f"{metric}: global - local",
            title="Global against local model, per client",
        )

    def summary(self) -> str:
        """One paragraph: the table, then how many clients gain or lose from the global model."""
        n = len(self.clients)
        neutral = n - len(self.gains) - len(self.losses)
        return (
            f"{self.table(style='text')}\n"
            f"{len(self.gains)} of {n} clients gain from the global model, "
            f"{len(self.losses)} lose, {neutral} show no significant difference "
            f"(accuracy, Holm-adjusted p < {self.level})."
        )


def fedlabel_select(local_probs: np.ndarray, global_probs: np.ndarray) -> np.ndarray:
    """Per sample, the prediction of whichever model is more confident (FedLabel).

    A sample takes the local model's probabilities when its top probability
    is at least the global model's, the global model's otherwise.

    References
    ----------
    Cho et al., "Local or Global: Selective Knowledge Assimilation for
    Federated Learning with Limited Labels", ICCV 2023.

    Examples
    --------
    >>> local = np.array([[0.9, 0.1], [0.6, 0.4]])
    >>> glob = np.array([[0.2, 0.8], [0.1, 0.9]])
    >>> fedlabel_select(local, glob)
    array([[0.9, 0.1],
           [0.1, 0.9]])
    """
    local_probs = np.asarray(local_probs)
    global_probs = np.asarray(global_probs)
    if local_probs.shape != global_probs.shape:
        raise DataError(
            f"fedlabel_select: local and global predictions differ in shape "
            f"({local_probs.shape} and {global_probs.shape}); give both for the same samples"
        )
    take_local = local_probs.max(axis=1) >= global_probs.max(axis=1)
    return np.where(take_local[:, None], local_probs, global_probs)


def _probabilities(
    model: nn.Module, state: Mapping[str, torch.Tensor], x: torch.Tensor
) -> np.ndarray:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = torch.func.functional_call(model, dict(state), (x,))
    finally:
        model.train(was_training)
    return torch.softmax(logits.double(), dim=1).numpy()


def _check_client(
    client: ClientSplit, global_state: Mapping[str, torch.Tensor], where: str
) -> None:
    local = client.local_state
    missing = sorted(set(global_state) - set(local))[:5]
    extra = sorted(set(local) - set(global_state))[:5]
    if missing or extra:
        raise DataError(
            f"{where} local_state: tensor names differ from the global model's "
            f"(missing {repr(missing)[:120]}, extra {repr(extra)[:120]}); "
            "give the local model of the same architecture"
        )
    for name, value in global_state.items():
        if tuple(local[name].shape) != tuple(value.shape):
            raise DataError(
                f"{where} local_state: tensor {repr(name)[:60]} has shape "
                f"{list(local[name].shape)}, the global model's has {list(value.shape)}"
            )
    for split in ("val", "test"):
        n_x, n_y = len(getattr(client, f"x_{split}")), len(getattr(client, f"y_{split}"))
        if n_x != n_y or n_x == 0:
            raise DataError(
                f"{where} x_{split}/y_{split}: expected the same positive number of samples, "
                f"got {n_x} inputs and {n_y} labels"
            )


def _labels(y: torch.Tensor, n_classes: int, where: str) -> np.ndarray:
    labels = np.asarray(torch.as_tensor(y).detach().cpu().numpy())
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{where}: expected a 1-D tensor of integer class labels, "
            f"got shape {labels.shape} of dtype {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(
            f"{where}: labels must lie in [0, {n_classes}); the model has {n_classes} outputs"
        )
    return labels.astype(np.int64)


class Personalizer:
    """Compare local, global, interpolated and FedLabel-selected models per client.

    Parameters
    ----------
    model : torch.nn.Module
        The architecture: called with each state dict through
        ``torch.func.functional_call`` (its own weights are never changed);
        returns logits of shape ``(n, n_classes)``.
    alphas : int or sequence of float, default 11
        The interpolation weights of the local model tried on validation
        (as in :func:`modelfuse.search.wise_ft_sweep`).
    alpha_metric : {"nll", "accuracy"}, default "nll"
        What alpha maximises on validation (``nll`` is negated).
    calibrate : str, optional
        A :data:`modelfuse.calibration.CALIBRATORS` name: each client's
        candidates are calibrated on that client's validation split.
    n_resamples, confidence_level, level, random_state
        The paired bootstrap (:func:`modelfuse.evaluation.paired_bootstrap`)
        and the significance level of the Holm-adjusted tests.

    Examples
    --------
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Linear(2, 2)
    >>> x = torch.randn(40, 2); y = (x[:, 0] > 0).long()
    >>> local = {"weight": torch.tensor([[-3.0, 0.0], [3.0, 0.0]]), "bias": torch.zeros(2)}
    >>> glob = {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
    >>> split = ClientSplit("a", local, x[:20], y[:20], x[20:], y[20:])
    >>> r = Personalizer(net, n_resamples=200).fit([split], glob)
    >>> r.clients[0].scores["local"]["accuracy"]
    1.0
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        alphas: int | Sequence[float] = 11,
        alpha_metric: Literal["nll", "accuracy"] = "nll",
        calibrate: str | None = None,
        n_resamples: int = 1000,
        confidence_level: float = 0.95,
        level: float = 0.05,
        random_state: int | None = 0,
    ) -> None:
        self.model = model
        self.alphas = alphas
        self.alpha_metric = alpha_metric
        self.calibrate = calibrate
        self.n_resamples = n_resamples
        self.confidence_level = confidence_level
        self.level = level
        self.random_state = random_state

    def fit(
        self, clients: Sequence[ClientSplit], global_state: Mapping[str, torch.Tensor]
    ) -> PersonalizationResult:
        """Evaluate every client; the result is also stored as ``result_``."""
        from modelfuse.calibration import expected_calibration_error as _ece
        from modelfuse.calibration import negative_log_likelihood as _nll
        from modelfuse.evaluation import holm, paired_bootstrap
        from modelfuse.search.wise_ft import wise_ft_sweep

        if self.alpha_metric not in ("nll", "accuracy"):
            raise ConfigError(
                f"alpha_metric: expected 'nll' or 'accuracy', got {repr(self.alpha_metric)[:60]}"
            )
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"level: expected a value in (0, 1), got {self.level!r}")
        if not clients:
            raise DataError("clients: expected at least one ClientSplit, got none")
        names = [c.name for c in clients]
        if len(set(names)) != len(names):
            raise DataError("clients: every client needs its own name; a name is given twice")

        def metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
            return {
                "accuracy": float(np.mean(p.argmax(axis=1) == y)),
                "nll": float(_nll(p, y)),
                "ece": float(_ece(p, y)),
            }

        drafts = []
        self.alphas_: dict[str, float] = {}
        for client in clients:
            where = f"client {repr(client.name)[:60]}"
            _check_client(client, global_state, where)
            p_global_val = _probabilities(self.model, global_state, client.x_val)
            y_val = _labels(client.y_val, p_global_val.shape[1], f"{where} y_val")

            def score(state: Mapping[str, torch.Tensor], x=client.x_val, y=y_val) -> float:
                p = _probabilities(self.model, state, x)
                if self.alpha_metric == "accuracy":
                    return float(np.mean(p.argmax(axis=1) == y))
                return -float(_nll(p, y))

            sweep = wise_ft_sweep(global_state, client.local_state, score, alphas=self.alphas)
            alpha = float(sweep.parameters["alpha"])
            states = {
                "local": client.local_state,
                "global": global_state,
                "interpolated": sweep.state_dict,
            }
            val = {k: _probabilities(self.model, s, client.x_val) for k, s in states.items()}
            test = {k: _probabilities(self.model, s, client.x_test) for k, s in states.items()}
            y_test = _labels(client.y_test, test["global"].shape[1], f"{where} y_test")
            if self.calibrate is not None:
                from modelfuse.calibration import make_calibrator

                for k in states:
                    cal = make_calibrator(self.calibrate, kind="probabilities").fit(val[k], y_val)
                    val[k] = cal.predict_proba(val[k])
                    test[k] = cal.predict_proba(test[k])
            test["selected"] = fedlabel_select(test["local"], test["global"])
            scores = {k: metrics(test[k], y_test) for k in CANDIDATES}
            diffs: dict[str, dict[str, IntervalResult]] = {}
            for k in CANDIDATES[1:]:
                diffs[k] = {
                    m: paired_bootstrap(
                        test[k],
                        test["local"],
                        y_test,
                        metric=m,
                        method="percentile",
                        confidence_level=self.confidence_level,
                        n_resamples=self.n_resamples,
                        random_state=self.random_state,
                        names=(k, "local"),
                    )
                    for m in _METRICS
                }
            self.alphas_[client.name] = alpha
            drafts.append((client.name, alpha, scores, diffs))

        adjusted: dict[str, dict[str, dict[str, float]]] = {
            n: {k: {} for k in CANDIDATES[1:]} for n in names
        }
        for m in _METRICS:
            keys = [(n, k) for n, *_ in drafts for k in CANDIDATES[1:]]
            pvalues = [d[3][k][m].pvalue for d in drafts for k in CANDIDATES[1:]]
            for (n, k), p in zip(keys, holm(pvalues), strict=True):
                adjusted[n][k][m] = float(p)
        comparisons = [ClientComparison(n, a, s, d, adjusted[n]) for n, a, s, d in drafts]
        gains = [
            c.name
            for c in comparisons
            if c.adjusted_pvalues["global"]["accuracy"] < self.level
            and c.differences["global"]["accuracy"].statistic > 0
        ]
        losses = [
            c.name
            for c in comparisons
            if c.adjusted_pvalues["global"]["accuracy"] < self.level
            and c.differences["global"]["accuracy"].statistic < 0
        ]
        self.result_ = PersonalizationResult(comparisons, self.level, gains, losses)
        return self.result_
