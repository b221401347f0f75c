"""Diagonal Fisher information of a classifier, from batched per-example gradients."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from modelfuse.errors import ConfigError, DataError
from modelfuse.statistics.batches import (
    Inputs,
    ProgressCallback,
    call_model,
    evaluation_mode,
    extract_logits,
    iterate_batches,
    model_device,
)
from modelfuse.statistics.storage import Statistics

__all__ = ["FisherKind", "fisher_diagonal"]

FisherKind = Literal["exact", "empirical"]

_CHUNK_BYTES = 64 * 2**20  # per-example gradients held at once by one vmap call


def _single(inputs: Inputs) -> Inputs:
    """Give one example (as vmap hands it over, without its batch dimension) a batch of 1."""
    if isinstance(inputs, torch.Tensor):
        return inputs.unsqueeze(0)
    return {key: value.unsqueeze(0) for key, value in inputs.items()}


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter's first name -> every name it has in ``state_dict`` (tied weights)."""
    first: dict[int, str] = {}
    names: dict[str, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        key = first.setdefault(id(parameter), name)
        names.setdefault(key, []).append(name)
    return names


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    n_examples: int = 4096,
    kind: FisherKind = "exact",
    chunk_size: int | None = None,
    progress: ProgressCallback | None = None,
) -> Statistics:
    r"""Diagonal of the Fisher information matrix of a classifier's parameters.

    For logits :math:`z(x; \theta)` and :math:`p = \mathrm{softmax}(z)`:

    - ``kind="exact"``: :math:`F = \frac{1}{n}\sum_x \sum_c p_c(x)\,
      (\nabla_\theta \log p_c(x))^2`, the expectation over the model's own
      predictive distribution, summed over every class (no sampling);
    - ``kind="empirical"``: :math:`F = \frac{1}{n}\sum_x (\nabla_\theta \log
      p_{y}(x))^2` with the true label :math:`y` only.

    Per-example gradients are computed in batches with ``torch.func``
    (``functional_call`` + ``vmap`` + ``grad``). Since
    :math:`\nabla_\theta \log p_c = J^\top (e_c - p)` with :math:`J = \partial
    z / \partial\theta`, the gradient for class :math:`c` weighted by
    :math:`\sqrt{p_c}` is the gradient of :math:`r^\top z` with the fixed
    vector :math:`r = \sqrt{p_c}\,(e_c - p)`; the exact Fisher takes one such
    batched gradient per class, the empirical one a single one with
    :math:`r = e_y - p`.

    Parameters
    ----------
    model : nn.Module
        A classifier returning ``(batch, classes)`` logits (a tensor, an object
        with ``.logits`` such as a Hugging Face output, or a tuple whose first
        item is the logits). It is run in evaluation mode (dropout off,
        batch-norm running statistics) and left exactly as it was found:
        training flags, ``requires_grad`` flags and ``.grad`` are untouched.
    batches : iterable
        Batches of ``(inputs, labels)`` or of inputs alone (then only
        ``kind="exact"`` works). Inputs are a tensor (``model(inputs)``) or a
        mapping of tensors (``model(**inputs)``); labels are class indices.
    n_examples : int, default 4096
        Use the first ``n_examples`` examples (fewer if the batches run out; the
        number used is in the result's ``n_examples``). 4096 is the reference
        implementation's choice.
    kind : {"exact", "empirical"}, default "exact"
        Which Fisher (see above).
    chunk_size : int, optional
        Examples per ``vmap`` call. By default as many as keep the per-example
        gradients under 64 MB.
    progress : callable, optional
        Called after each batch with the number of examples processed so far.

    Returns
    -------
    Statistics
        ``{name: Tensor}`` for every parameter, keyed by its ``state_dict``
        name (tied parameters under each of their names), float32, with
        ``kind="fisher"``, ``estimator`` and ``n_examples`` set.

    Raises
    ------
    ConfigError
        ``kind`` is unknown or ``chunk_size`` is not positive.
    DataError
        The batches are malformed, labels are missing for the empirical Fisher
        or out of range, or the model does not return ``(batch, classes)`` logits.

    Notes
    -----
    The model must treat examples independently in evaluation mode (true of
    ordinary classifiers) so that each example can be run alone under ``vmap``.

    References
    ----------
    Matena and Raffel, "Merging models with Fisher-weighted averaging",
    NeurIPS 2022 (diagonal Fisher over 4096 examples, expectation over the
    model's predictive distribution).

    Examples
    --------
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Linear(3, 2)
    >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    >>> fisher = fisher_diagonal(model, [(x, y)])
    >>> sorted(fisher), fisher["weight"].shape, fisher.n_examples
    (['bias', 'weight'], torch.Size([2, 3]), 16)
    """
    if kind not in ("exact", "empirical"):
        raise ConfigError(f"kind: unknown Fisher kind {kind!r}; valid: exact, empirical")
    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size: expected a positive number of examples, got {chunk_size}")
    aliases = _aliases(model)
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    if not params:
        raise ConfigError("model: it has no parameters, so it has no Fisher information")
    total_numel = sum(p.numel() for p in params.values())
    per_example_bytes = total_numel * 4
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_BYTES // per_example_bytes)
    device = model_device(model)
    sums = {
        name: torch.zeros(p.shape, dtype=torch.float32, device=device) for name, p in params.items()
    }

    def weighted_logits(
        parameters: dict[str, torch.Tensor], inputs: Inputs, r: torch.Tensor
    ) -> torch.Tensor:
        single = _single(inputs)
        if isinstance(single, torch.Tensor):
            output = functional_call(model, (parameters, buffers), (single,))
        else:
            output = functional_call(model, (parameters, buffers), (), single)
        logits = extract_logits(output).squeeze(0)
        return (logits.to(r.dtype) * r).sum()

    per_example_grad = vmap(grad(weighted_logits), in_dims=(None, 0, 0), chunk_size=chunk_size)

    def accumulate(inputs: Inputs, r: torch.Tensor) -> None:
        grads = per_example_grad(params, inputs, r)
        for name, g in grads.items():
            g32 = g.to(torch.float32)
            sums[name].add_(torch.einsum("b...,b...->...", g32, g32))

    n_seen = 0
    with evaluation_mode(model):
        for batch in iterate_batches(
            batches, n_examples, device=device, need_labels=kind == "empirical"
        ):
            with torch.no_grad():
                logits = extract_logits(
                    call_model(model, batch.inputs), where=f"model output (after {n_seen} examples)"
                ).to(torch.float32)
            probs = torch.softmax(logits, dim=-1)
            n_classes = int(probs.shape[1])
            if kind == "empirical":
                labels = batch.labels
                if labels is None:  # iterate_batches already refuses this; keeps the types exact
                    raise DataError("batches: the empirical Fisher needs labels")
                if bool((labels < 0).any()) or bool((labels >= n_classes).any()):
                    raise DataError(
                        f"batches: labels after {n_seen} examples range over "
                        f"[{int(labels.min())}, {int(labels.max())}], but the model has "
                        f"{n_classes} classes; expected labels in [0, {n_classes - 1}]"
                    )
                onehot = torch.nn.functional.one_hot(labels, n_classes).to(probs.dtype)
                accumulate(batch.inputs, onehot - probs)
            else:
                eye = torch.eye(n_classes, dtype=probs.dtype, device=probs.device)
                for c in range(n_classes):
                    accumulate(batch.inputs, (eye[c] - probs) * probs[:, c : c + 1].sqrt())
            n_seen += batch.size
            if progress is not None:
                progress(n_seen)

    result: dict[str, torch.Tensor] = {}
    for name, total in sums.items():
        mean = total.div_(n_seen)
        for i, alias in enumerate(aliases.get(name, [name])):
            result[alias] = mean if i == 0 else mean.clone()
    return Statistics(result, kind="fisher", n_examples=n_seen, estimator=kind)
