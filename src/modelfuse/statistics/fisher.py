"""Diagonal Fisher information of a classifier, from batched per-example gradients."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
from modelfuse.statistics.linear_taps import LinearTaps
from modelfuse.statistics.padding import unpadded
from modelfuse.statistics.storage import Statistics

__all__ = ["FisherKind", "fisher_diagonal"]

FisherKind = Literal["exact", "empirical"]

_CHUNK_BYTES = 64 * 2**20  # per-example gradients held at once by one vmap call


def _single(inputs: Inputs) -> Inputs:
    """Give one example (as vmap hands it over, without its batch dimension) a batch of 1."""
    if isinstance(inputs, torch.Tensor):
        return inputs.unsqueeze(0)
    return {key: value.unsqueeze(0) for key, value in inputs.items()}


def _constant_mask(inputs: Inputs) -> tuple[Inputs, Any]:
    """Inputs for ``vmap`` and their ``in_dims``: an all-1 ``attention_mask`` as one shared row.

    The mask of an unpadded batch is all 1s and the same for every example;
    handed to ``vmap`` unbatched, models that inspect it (Hugging Face's mask
    builders test ``mask.all()``) see a plain tensor instead of a batched one,
    on which such data-dependent checks fail.
    """
    if not isinstance(inputs, Mapping):
        return inputs, 0
    mask = inputs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or not bool((mask != 0).all()):
        return inputs, 0
    shared = dict(inputs)
    shared["attention_mask"] = mask[0]
    return shared, {key: None if key == "attention_mask" else 0 for key in shared}


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
    linear_shortcut: bool = True,
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
    (``functional_call`` + ``vmap`` + ``grad``), never in a Python loop over
    examples. Since :math:`\nabla_\theta \log p_c = J^\top (e_c - p)` with
    :math:`J = \partial z / \partial\theta`, the gradient for class :math:`c`
    weighted by :math:`\sqrt{p_c}` is the gradient of :math:`r^\top z` with the
    fixed vector :math:`r = \sqrt{p_c}\,(e_c - p)`; the exact Fisher takes one
    such batched gradient per class, the empirical one a single one with
    :math:`r = e_y - p`.

    Linear-layer shortcut (exact, not an approximation): an ``nn.Linear`` run
    once per example on a vector input has per-example weight gradient
    :math:`\delta_n x_n^\top` (output gradient times input), so the sum of
    its squares is the matrix product :math:`(\delta^2)^\top x^2`. For such
    layers the same ``vmap(grad(...))`` call differentiates a zero probe added
    to the layer's output instead of the weight, and records the input, which
    avoids writing one weight-sized gradient per example. On the first batch
    the factored gradient of each such layer is checked against the ordinary
    batch gradient; a layer whose weight is also used elsewhere fails the
    check and goes through the general path. Layers on sequences (inputs
    with extra dimensions), layers called more than once and tied weights
    always use the general path.

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
        A mapping with a 2-D ``attention_mask`` (a padded batch of texts) is
        run without its padding: examples are regrouped by their number of
        real tokens and each group runs on those tokens only
        (:func:`modelfuse.statistics.padding.unpadded`), so padding changes
        no entry of the Fisher.
    n_examples : int, default 4096
        Use the first ``n_examples`` examples (fewer if the batches run out; the
        number used is in the result's ``n_examples``). 4096 is the reference
        implementation's choice.
    kind : {"exact", "empirical"}, default "exact"
        Which Fisher (see above).
    chunk_size : int, optional
        Examples per ``vmap`` call. By default as many as keep the
        materialised per-example gradients under 64 MB.
    linear_shortcut : bool, default True
        Use the linear-layer shortcut described above (same result, less
        memory traffic); False materialises every per-example gradient.
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
        or out of range, an ``attention_mask`` is not a padding mask, or the
        model does not return ``(batch, classes)`` logits.

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
    device = model_device(model)
    sums = {
        name: torch.zeros(p.shape, dtype=torch.float32, device=device) for name, p in params.items()
    }
    taps = LinearTaps(model)
    n_seen = 0
    with evaluation_mode(model), taps.installed():
        per_example: _PerExample | None = None
        for batch in iterate_batches(
            batches, n_examples, device=device, need_labels=kind == "empirical"
        ):
            for inputs, labels in unpadded(
                batch.inputs, batch.labels, where=f"batches (after {n_seen} examples)"
            ):
                per_example = _accumulate_part(
                    model,
                    params,
                    buffers,
                    taps,
                    per_example,
                    inputs,
                    labels,
                    kind=kind,
                    n_seen=n_seen,
                    chunk_size=chunk_size,
                    linear_shortcut=linear_shortcut,
                    sums=sums,
                )
            n_seen += batch.size
            if progress is not None:
                progress(n_seen)

    result: dict[str, torch.Tensor] = {}
    for name, total in sums.items():
        mean = total.div_(n_seen)
        for i, alias in enumerate(aliases.get(name, [name])):
            result[alias] = mean if i == 0 else mean.clone()
    return Statistics(result, kind="fisher", n_examples=n_seen, estimator=kind)


def _accumulate_part(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    taps: LinearTaps,
    per_example: _PerExample | None,
    inputs: Inputs,
    labels: torch.Tensor | None,
    *,
    kind: FisherKind,
    n_seen: int,
    chunk_size: int | None,
    linear_shortcut: bool,
    sums: dict[str, torch.Tensor],
) -> _PerExample:
    """Add one unpadded part of a batch to ``sums``; the per-example runner for the next part."""
    taps.reset_counts()
    with torch.no_grad():
        logits = extract_logits(
            call_model(model, inputs), where=f"model output (after {n_seen} examples)"
        ).to(torch.float32)
    probs = torch.softmax(logits, dim=-1)
    residuals = _residuals(probs, labels, kind, n_seen)
    if per_example is None:  # first batch: choose and check the linear shortcut
        fast = taps.qualified() if linear_shortcut else []
        per_example = _PerExample(model, params, buffers, taps, fast, chunk_size)
        per_example = per_example.checked(inputs, residuals[0])
    elif not set(per_example.fast) <= set(taps.qualified()):
        # a layer ran differently on this batch: take it off the shortcut from now on
        fast = [layer for layer in per_example.fast if layer in taps.qualified()]
        per_example = _PerExample(model, params, buffers, taps, fast, chunk_size)
    per_example.accumulate(inputs, int(logits.shape[0]), residuals, sums)
    return per_example


def _residuals(
    probs: torch.Tensor, labels: torch.Tensor | None, kind: FisherKind, n_seen: int
) -> list[torch.Tensor]:
    """Vectors r with grad(r . z) = the weighted per-example gradients of log-probabilities."""
    n_classes = int(probs.shape[1])
    if kind == "exact":
        eye = torch.eye(n_classes, dtype=probs.dtype, device=probs.device)
        return [(eye[c] - probs) * probs[:, c : c + 1].sqrt() for c in range(n_classes)]
    if labels is None:  # iterate_batches already refuses this; keeps the types exact
        raise DataError("batches: the empirical Fisher needs labels")
    if bool((labels < 0).any()) or bool((labels >= n_classes).any()):
        raise DataError(
            f"batches: labels after {n_seen} examples range over "
            f"[{int(labels.min())}, {int(labels.max())}], but the model has "
            f"{n_classes} classes; expected labels in [0, {n_classes - 1}]"
        )
    return [torch.nn.functional.one_hot(labels, n_classes).to(probs.dtype) - probs]


class _PerExample:
    """Per-example gradients, by ``vmap(grad(...))``, of r . z(x) for one batch.

    Parameters of the linear layers in ``fast`` are not differentiated; the
    gradient at their output (a zero probe) and their input are, and their
    Fisher entries come from one matrix product (see
    :mod:`modelfuse.statistics.linear_taps`). Every other parameter's
    per-example gradient is materialised, ``chunk_size`` examples at a time.
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        taps: LinearTaps,
        fast: list[str],
        chunk_size: int | None,
    ) -> None:
        self.model, self.params, self.buffers, self.taps = model, params, buffers, taps
        self.fast = fast
        self.chunk_size = chunk_size
        shortcut = {name for layer in fast for name in taps.parameter_names(layer) if name}
        self.slow = {n: p for n, p in params.items() if n not in shortcut}
        self.fixed = {n: p for n, p in params.items() if n in shortcut}
        slow_bytes = 4 * sum(p.numel() for p in self.slow.values())
        if chunk_size is None:
            chunk_size = max(1, _CHUNK_BYTES // slow_bytes) if slow_bytes else None
        self.vmap_chunk = chunk_size
        self.gradients = grad(self._weighted_logits, argnums=(0, 1), has_aux=True)

    def _weighted_logits(
        self,
        slow: dict[str, torch.Tensor],
        probes: dict[str, torch.Tensor],
        inputs: Inputs,
        r: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.taps.probes, self.taps.inputs = probes, {}
        try:
            single = _single(inputs)
            state = ({**slow, **self.fixed}, self.buffers)
            if isinstance(single, torch.Tensor):
                output = functional_call(self.model, state, (single,))
            else:
                output = functional_call(self.model, state, (), single)
            recorded = {
                layer: self.taps.inputs.get(layer, probes[layer].new_zeros(1, self._in(layer)))
                for layer in self.fast
            }
        finally:
            self.taps.probes, self.taps.inputs = None, {}
        logits = extract_logits(output).squeeze(0)
        return (logits.to(r.dtype) * r).sum(), recorded

    def _in(self, layer: str) -> int:
        return int(self.taps.layers[layer].in_features)

    def _probes(self, size: int) -> dict[str, torch.Tensor]:
        return {
            layer: torch.zeros(
                size, 1, self.taps.layers[layer].out_features, device=self.params_device()
            )
            for layer in self.fast
        }

    def params_device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def run(
        self, inputs: Inputs, size: int, r: torch.Tensor, *, slow: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-example slow-parameter gradients, output gradients and inputs of fast layers.

        ``slow=False`` leaves the slow parameters out (no gradients for them):
        only the fast layers' output gradients and inputs.
        """
        differentiated = self.slow if slow else {}
        inputs, dims = _constant_mask(inputs)
        if size == 1:  # one example: plain gradients, without vmap's batching overhead
            probes = {k: v[0] for k, v in self._probes(1).items()}
            one = (
                inputs[0]
                if isinstance(inputs, torch.Tensor)
                else {k: v if dims != 0 and dims[k] is None else v[0] for k, v in inputs.items()}
            )
            (slow_grads, deltas), recorded = self.gradients(differentiated, probes, one, r[0])
            slow_grads = {k: v.unsqueeze(0) for k, v in slow_grads.items()}
        else:
            function = vmap(self.gradients, in_dims=(None, 0, dims, 0), chunk_size=self.vmap_chunk)
            (slow_grads, deltas), recorded = function(differentiated, self._probes(size), inputs, r)
        deltas = {k: v.reshape(size, -1).to(torch.float32) for k, v in deltas.items()}
        recorded = {k: v.reshape(size, -1).to(torch.float32) for k, v in recorded.items()}
        return slow_grads, deltas, recorded

    def checked(self, inputs: Inputs, r: torch.Tensor) -> _PerExample:
        """Keep only the fast layers whose factored batch gradient matches autograd's on this batch.

        Guards the shortcut's assumption (the weight is used only by its own
        layer's forward, once per example) on a model that might break it.
        """
        if not self.fast:
            return self
        size = int(r.shape[0])
        # the fast layers alone: the slow parameters' per-example gradients of a whole batch
        # would be held at once (gigabytes for a transformer)
        _, deltas, recorded = self.run(inputs, size, r, slow=False)
        weights = {layer: self.taps.parameter_names(layer)[0] for layer in self.fast}

        def batch_objective(chosen: dict[str, torch.Tensor]) -> torch.Tensor:
            state = ({**self.params, **chosen}, self.buffers)
            if isinstance(inputs, torch.Tensor):
                output = functional_call(self.model, state, (inputs,))
            else:
                output = functional_call(self.model, state, (), dict(inputs))
            return (extract_logits(output).to(r.dtype) * r).sum()

        reference = grad(batch_objective)({w: self.params[w] for w in weights.values()})
        keep = []
        for layer, weight in weights.items():
            factored = deltas[layer].T @ recorded[layer]
            expected = reference[weight].to(torch.float32)
            scale = float(expected.abs().max()) + 1e-12
            if torch.allclose(factored, expected, rtol=1e-3, atol=1e-4 * scale):
                keep.append(layer)
        if keep == self.fast:
            return self
        return _PerExample(self.model, self.params, self.buffers, self.taps, keep, self.chunk_size)

    def accumulate(
        self,
        inputs: Inputs,
        size: int,
        residuals: list[torch.Tensor],
        sums: dict[str, torch.Tensor],
    ) -> None:
        """Add the batch's sums of squared per-example gradients to ``sums``.

        When one example's gradients fill a ``vmap`` chunk (a large model),
        the examples run one by one without ``vmap``, which is several times
        faster than ``vmap`` over chunks of one.
        """
        if size > 1 and self.vmap_chunk == 1:
            for i in range(size):
                one = (
                    inputs[i : i + 1]
                    if isinstance(inputs, torch.Tensor)
                    else {k: v[i : i + 1] for k, v in inputs.items()}
                )
                self.accumulate(one, 1, [r[i : i + 1] for r in residuals], sums)
            return
        squared = {layer: None for layer in self.fast}  # sum over residuals of delta^2
        recorded: dict[str, torch.Tensor] = {}
        for r in residuals:
            slow_grads, deltas, recorded = self.run(inputs, size, r)
            for name, g in slow_grads.items():
                g32 = g.to(torch.float32)
                sums[name].add_(torch.einsum("b...,b...->...", g32, g32))
            for layer, delta in deltas.items():
                previous = squared[layer]
                squared[layer] = (
                    delta.square() if previous is None else previous.add_(delta.square())
                )
        for layer in self.fast:
            s = squared[layer]
            if s is None:
                continue
            weight, bias = self.taps.parameter_names(layer)
            sums[weight].addmm_(s.T, recorded[layer].square())
            if bias is not None:
                sums[bias].add_(s.sum(0))
