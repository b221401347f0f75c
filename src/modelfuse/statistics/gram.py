"""Gram matrices of the inputs of every linear layer, for RegMean."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from modelfuse.errors import ConfigError
from modelfuse.statistics.batches import (
    ProgressCallback,
    call_model,
    evaluation_mode,
    iterate_batches,
    model_device,
)
from modelfuse.statistics.storage import Statistics

__all__ = ["UnusedLayerWarning", "gram_matrices"]


class UnusedLayerWarning(UserWarning):
    """A linear layer never ran on the data, so it has no Gram matrix."""


def gram_matrices(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    n_examples: int = 1000,
    progress: ProgressCallback | None = None,
) -> Statistics:
    r"""Gram matrix :math:`G = X^\top X / n` of the inputs of every ``nn.Linear``.

    Forward hooks record the input :math:`x` of each linear layer. For an
    input with extra dimensions (a sequence model's ``(batch, positions,
    features)``) every position is one row of :math:`X`: the matrix is the sum
    of :math:`x x^\top` over all examples and positions divided by the number
    of rows :math:`n` (examples times positions, padding included). A layer
    called several times per forward (shared weights) gathers the rows of every
    call. Sums are accumulated in float64.

    Parameters
    ----------
    model : nn.Module
        Any module; it is run in evaluation mode under ``torch.no_grad()`` and
        left as it was found (training flags restored, no hooks left, even when
        an error interrupts the run).
    batches : iterable
        Batches of inputs or of ``(inputs, labels)`` (labels are ignored);
        inputs are a tensor (``model(inputs)``) or a mapping
        (``model(**inputs)``).
    n_examples : int, default 1000
        Use the first ``n_examples`` examples (RegMean's reference uses 1000);
        the number used is in the result's ``n_examples``.
    progress : callable, optional
        Called after each batch with the number of examples processed so far.

    Returns
    -------
    Statistics
        ``{"<layer>.weight": Tensor (in_features, in_features)}``, float32,
        keyed by the name of each linear layer's weight in ``state_dict``, with
        ``kind="gram"``. Layers that never ran are left out with an
        :class:`UnusedLayerWarning`.

    Raises
    ------
    ConfigError
        The model has no ``nn.Linear`` layer.
    DataError
        The batches are malformed.

    References
    ----------
    Jin et al., "Dataless knowledge fusion by merging weights of language
    models", ICLR 2023 (RegMean).

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> grams = gram_matrices(model, [torch.randn(10, 3)])
    >>> {name: tuple(g.shape) for name, g in grams.items()}
    {'0.weight': (3, 3), '2.weight': (4, 4)}
    >>> x = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    >>> gram_matrices(nn.Linear(4, 1), [x])["weight"][:2, :2]
    tensor([[1., 2.],
            [2., 4.]])
    """
    layers: dict[int, tuple[nn.Linear, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear):
            weight_name = f"{name}.weight" if name else "weight"
            entry = layers.setdefault(id(module), (module, []))
            entry[1].append(weight_name)
    if not layers:
        raise ConfigError(
            "model: it has no nn.Linear layer, so there are no Gram matrices to compute; "
            "RegMean merges linear layers only"
        )
    device = model_device(model)
    sums: dict[int, torch.Tensor] = {}
    rows: dict[int, int] = {}

    def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
        key = id(module)
        if key not in sums:
            sums[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            rows[key] = 0
        sums[key].addmm_(x.T, x)
        rows[key] += int(x.shape[0])

    handles = [module.register_forward_hook(record) for module, _ in layers.values()]
    n_seen = 0
    try:
        with evaluation_mode(model), torch.no_grad():
            for batch in iterate_batches(batches, n_examples, device=device, need_labels=False):
                call_model(model, batch.inputs)
                n_seen += batch.size
                if progress is not None:
                    progress(n_seen)
    finally:
        for handle in handles:
            handle.remove()

    result: dict[str, torch.Tensor] = {}
    for key, (_module, names) in layers.items():
        if key not in sums or rows[key] == 0:
            warnings.warn(
                f"linear layer {names[0]} never ran on the data, so it has no Gram matrix; "
                "RegMean will average it",
                UnusedLayerWarning,
                stacklevel=2,
            )
            continue
        gram = (sums[key] / rows[key]).to(torch.float32)
        for i, name in enumerate(names):
            result[name] = gram if i == 0 else gram.clone()
    return Statistics(result, kind="gram", n_examples=n_seen)
