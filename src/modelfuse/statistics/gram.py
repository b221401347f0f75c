"""Gram matrices of the inputs of every linear layer, for RegMean."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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

__all__ = ["GramSums", "UnusedLayerWarning", "add_gram_sums", "gram_matrices", "gram_sums"]


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
    return gram_sums(model, batches, n_examples=n_examples, progress=progress).matrices(
        stacklevel=3
    )


@dataclass(frozen=True)
class GramSums:
    """Unnormalised Gram sums of the linear layers' inputs, which add up across data shards.

    Attributes
    ----------
    sums : dict name -> Tensor
        :math:`\\sum x x^\\top` in float64, keyed by each linear layer's weight name
        (the first name of a shared layer); layers that never ran are absent.
    rows : dict name -> int
        The number of rows :math:`x` in each sum.
    names : tuple of tuple of str
        Every linear layer's weight names (several for a shared layer), in
        module order: the names of the result.
    n_examples : int
        Examples seen.
    """

    sums: dict[str, torch.Tensor]
    rows: dict[str, int]
    names: tuple[tuple[str, ...], ...]
    n_examples: int

    def matrices(self, *, stacklevel: int = 2) -> Statistics:
        """The Gram matrices :math:`G = \\sum x x^\\top / n_{rows}`, float32.

        Layers without rows are left out with an :class:`UnusedLayerWarning`.
        """
        result: dict[str, torch.Tensor] = {}
        for names in self.names:
            key = names[0]
            if key not in self.sums or self.rows[key] == 0:
                warnings.warn(
                    f"linear layer {key} never ran on the data, so it has no Gram matrix; "
                    "RegMean will average it",
                    UnusedLayerWarning,
                    stacklevel=stacklevel,
                )
                continue
            gram = (self.sums[key] / self.rows[key]).to(torch.float32)
            for i, name in enumerate(names):
                result[name] = gram if i == 0 else gram.clone()
        return Statistics(result, kind="gram", n_examples=self.n_examples)


def add_gram_sums(parts: Sequence[GramSums]) -> GramSums:
    """The sums of disjoint data shards added up: the sums of all their data.

    Examples
    --------
    >>> layer = nn.Linear(2, 1)
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    >>> whole = gram_sums(layer, [x]).matrices()["weight"]
    >>> split = add_gram_sums([gram_sums(layer, [x[:1]]), gram_sums(layer, [x[1:]])])
    >>> bool(torch.equal(split.matrices()["weight"], whole))
    True
    """
    if not parts:
        raise ConfigError("shards: expected at least one shard of data, received none")
    names = parts[0].names
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    for index, part in enumerate(parts):
        if part.names != names:
            raise ConfigError(
                f"shards: shard {index} has other linear layers than shard 0; "
                "compute every shard with the same model"
            )
        for key, value in part.sums.items():
            if key in sums and sums[key].shape != value.shape:
                raise ConfigError(
                    f"shards: shard {index} has a Gram sum of shape {list(value.shape)} for "
                    f"{key}, shard 0 {list(sums[key].shape)}; compute every shard with the "
                    "same model"
                )
            sums[key] = value.clone() if key not in sums else sums[key].add_(value)
            rows[key] = rows.get(key, 0) + part.rows[key]
    return GramSums(sums, rows, names, sum(part.n_examples for part in parts))


def gram_sums(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    n_examples: int = 1000,
    progress: ProgressCallback | None = None,
) -> GramSums:
    """The sums behind :func:`gram_matrices`, before the division by the row counts.

    Takes the same arguments as :func:`gram_matrices`; the sums of shards of
    the data add up (:func:`add_gram_sums`) to the sums of all of it, exactly
    in the number of rows, whatever each example's sequence length.
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

    return GramSums(
        sums={names[0]: sums[key] for key, (_module, names) in layers.items() if key in sums},
        rows={names[0]: rows[key] for key, (_module, names) in layers.items() if key in rows},
        names=tuple(tuple(names) for _module, names in layers.values()),
        n_examples=n_seen,
    )
