"""AdaMerging: task arithmetic coefficients learned by entropy minimisation on unlabeled data."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from modelfuse.errors import ConfigError, DataError
from modelfuse.search._state import check_matching, check_model_keys, is_float
from modelfuse.search.results import Candidate, SearchResult

__all__ = ["adamerging", "prediction_entropy"]

Granularity = Literal["task", "layer"]
_GRANULARITIES = ("task", "layer")


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over the rows.

    Examples
    --------
    >>> round(float(prediction_entropy(torch.zeros(3, 4))), 4)  # log 4
    1.3863
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


def _inputs(batches: Iterable[Any]) -> list[torch.Tensor]:
    out = []
    for i, batch in enumerate(batches):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise DataError(
                f"batches: batch {i} is a {type(x).__name__}; expected a tensor of inputs "
                "(or a tuple whose first entry is one; labels are ignored)"
            )
        out.append(x)
    if not out:
        raise DataError("batches: no batches given; pass a non-empty list of input tensors")
    return out


def adamerging(
    model: nn.Module,
    base: Mapping[str, torch.Tensor],
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    batches: Iterable[Any],
    *,
    granularity: Granularity = "task",
    init_lambda: float = 0.3,
    steps: int = 100,
    lr: float = 1e-3,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    layer_of: Callable[[str], str] | None = None,
) -> SearchResult:
    """Learn task arithmetic's coefficients by minimising the merged model's prediction entropy.

    The merged weights are :math:`\\theta_p = \\theta_{b,p} + \\sum_k
    \\lambda_{k,p} (\\theta_{k,p} - \\theta_{b,p})` for every parameter
    tensor :math:`p`, with one :math:`\\lambda_k` per task shared by every
    tensor (``granularity="task"``) or one :math:`\\lambda_{k,l}` per task and
    layer :math:`l` (``granularity="layer"``). A layer is by default one
    parameter tensor, as in the paper's layer-wise AdaMerging where every
    weight and bias tensor has its own coefficient; ``layer_of`` groups
    tensors instead (``layer_of=lambda name: name.rsplit(".", 1)[0]`` gives a
    layer's weight and bias one shared coefficient). The loss is
    the mean entropy of ``softmax(model(x))`` over a batch of unlabeled
    inputs, computed through :func:`torch.func.functional_call` with the
    merged weights; Adam takes one step per batch, cycling through
    ``batches``, and after each step the coefficients are projected onto
    ``bounds``.

    Floating-point buffers (BatchNorm running statistics) are merged with
    each task's mean coefficient, held fixed within a step; other buffers
    are the base model's. The model runs in eval mode; its own weights and
    training flag are left as they were.

    Parameters
    ----------
    model : nn.Module
        The architecture, mapping inputs to logits. Its weights are not used.
    base : mapping name -> Tensor
        The pre-trained model's ``state_dict()``. Not modified.
    state_dicts : sequence of mappings name -> Tensor
        The task models fine-tuned from ``base``. Not modified.
    batches : iterable of Tensor or of (Tensor, ...)
        Unlabeled inputs (labels, if present, are ignored); read once.
    granularity : {"task", "layer"}, default "task"
        One coefficient per task, or per task and parameter tensor.
    init_lambda : float, default 0.3
        Initial value of every coefficient (the paper's 0.3).
    steps : int, default 100
        Adam steps (one batch each).
    lr : float, default 1e-3
        Adam's learning rate (the paper's 1e-3).
    bounds : (float, float) or None, default (0, 1)
        Interval the coefficients are projected onto after every step;
        ``None`` leaves them free.
    layer_of : callable, optional
        ``layer_of(tensor_name) -> layer name`` for ``granularity="layer"``;
        tensors mapped to one name share a coefficient. Default: every
        parameter tensor is its own layer.

    Returns
    -------
    SearchResult
        ``parameters``: ``{"lambdas": (λ_1, ..., λ_K)}`` for task-wise, or
        ``{"lambdas": {layer: (λ_1, ..., λ_K)}}`` per layer (by default
        per parameter tensor name) for layer-wise, plus ``"granularity"``;
        ``state_dict``: the merged weights; ``score``: minus the mean
        entropy of the merged model over every sample of every batch;
        ``trace``: one candidate per step
        (``{"step": t, "lambdas": ...}``, scored by minus the entropy of
        that step's batch before its update).

    References
    ----------
    Yang et al., "AdaMerging: adaptive model merging for multi-task
    learning", ICLR 2024.

    Examples
    --------
    >>> _ = torch.manual_seed(0); m = torch.nn.Linear(4, 3)
    >>> base = {k: v.clone() for k, v in m.state_dict().items()}
    >>> task = {k: v + torch.randn_like(v) for k, v in base.items()}
    >>> x = torch.randn(32, 4)
    >>> r = adamerging(m, base, [task], [x], steps=20, lr=0.05)
    >>> r.score >= r.trace[0].score
    True
    """
    if granularity not in _GRANULARITIES:
        raise ConfigError(
            f"granularity: expected one of {', '.join(_GRANULARITIES)}, got {granularity!r}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps: expected a non-negative integer, got {steps!r}")
    if not lr > 0:
        raise ConfigError(f"lr: expected a positive learning rate, got {lr!r}")
    if bounds is not None and not bounds[0] <= init_lambda <= bounds[1]:
        raise ConfigError(f"init_lambda: {init_lambda} lies outside bounds {bounds}")
    if layer_of is not None and granularity != "layer":
        raise ConfigError("layer_of: only used with granularity='layer'; set it or drop layer_of")
    if len(state_dicts) == 0:
        raise ConfigError("state_dicts: no task models given; pass at least one")
    check_matching([base, *state_dicts], where="[base, *state_dicts]")
    check_model_keys(model, base, "base")
    inputs = _inputs(batches)

    param_names = {name for name, _ in model.named_parameters()}
    learned = [k for k, v in base.items() if k in param_names and is_float(v)]
    buffers = [k for k, v in base.items() if k not in param_names and is_float(v)]
    fixed = {k: v.detach() for k, v in base.items() if not is_float(v)}
    base32 = {k: base[k].detach().to(torch.float32) for k in learned + buffers}
    tasks = {
        k: torch.stack([sd[k].detach().to(torch.float32) - base32[k] for sd in state_dicts])
        for k in learned + buffers
    }
    group_of = {k: (k if layer_of is None else str(layer_of(k))) for k in learned}
    groups = list(dict.fromkeys(group_of.values()))
    group_index = {g: i for i, g in enumerate(groups)}
    n_tasks = len(state_dicts)
    shape = (n_tasks,) if granularity == "task" else (n_tasks, len(groups))
    lambdas = torch.full(shape, float(init_lambda), dtype=torch.float32, requires_grad=True)

    def coefficients(lam: torch.Tensor, name: str) -> torch.Tensor:
        return lam if granularity == "task" else lam[:, group_index[group_of[name]]]

    def merged(lam: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = dict(fixed)
        for k in learned:
            c = coefficients(lam, k).reshape((n_tasks,) + (1,) * base32[k].ndim)
            out[k] = base32[k] + (c * tasks[k]).sum(dim=0)
        per_task = (lam if granularity == "task" else lam.mean(dim=1)).detach()
        for k in buffers:
            c = per_task.reshape((n_tasks,) + (1,) * base32[k].ndim)
            out[k] = base32[k] + (c * tasks[k]).sum(dim=0)
        return {k: out[k].to(base[k].dtype) if is_float(base[k]) else out[k] for k in base}

    def snapshot(lam: torch.Tensor) -> Any:
        values = lam.detach().tolist()
        if granularity == "task":
            return tuple(values)
        return {g: tuple(row[i] for row in values) for i, g in enumerate(groups)}

    optimizer = torch.optim.Adam([lambdas], lr=lr)
    trace = []
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            x = inputs[step % len(inputs)]
            entropy = prediction_entropy(functional_call(model, merged(lambdas), (x,)))
            current = {"step": step, "lambdas": snapshot(lambdas)}
            trace.append(Candidate(current, -float(entropy.detach())))
            optimizer.zero_grad()
            entropy.backward()
            optimizer.step()
            if bounds is not None:
                with torch.no_grad():
                    lambdas.clamp_(bounds[0], bounds[1])
        with torch.no_grad():
            final = {k: v.detach() for k, v in merged(lambdas).items()}
            total, count = 0.0, 0
            for x in inputs:
                logits = functional_call(model, final, (x,))
                total += float(prediction_entropy(logits)) * logits.shape[0]
                count += logits.shape[0]
    finally:
        model.train(was_training)
    result_parameters = {"lambdas": snapshot(lambdas), "granularity": granularity}
    return SearchResult(result_parameters, final, -total / count, tuple(trace))
