"""Gram matrices of the inputs of every linear layer, for RegMean."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
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
from modelfuse.statistics.padding import padding_mask
from modelfuse.statistics.storage import Statistics

__all__ = [
    "GramSums",
    "UnusedLayerWarning",
    "WrittenStatistics",
    "add_gram_sums",
    "gram_matrices",
    "gram_passes",
    "gram_sums",
    "linear_layers",
    "write_gram_matrices",
]


class UnusedLayerWarning(UserWarning):
    """A linear layer never ran on the data, so it has no Gram matrix."""


def gram_matrices(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    n_examples: int = 1000,
    within: str | None = None,
    progress: ProgressCallback | None = None,
) -> Statistics:
    r"""Gram matrix :math:`G = X^\top X / n` of the inputs of every ``nn.Linear``.

    Forward hooks record the input :math:`x` of each linear layer. For an
    input with extra dimensions (a sequence model's ``(batch, positions,
    features)``) every position is one row of :math:`X`: the matrix is the sum
    of :math:`x x^\top` over all examples and positions divided by the number
    of rows :math:`n` (examples times real positions). Padding contributes
    nothing: when a batch's inputs hold a 2-D ``attention_mask`` (as a Hugging
    Face tokenizer pads a batch), the rows of positions where it is 0 are left
    out of every layer whose input is ``(batch, positions, features)``, so a
    padded batch gives the Gram matrices of its texts run one at a time. A
    layer called several times per forward (shared weights) gathers the rows
    of every call. Sums are accumulated in float64.

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
    within : str, optional
        Only the linear layers inside this submodule, e.g. ``"bert"`` for the
        backbone of a ``BertForSequenceClassification`` (the layers a merge of
        backbones uses; :func:`modelfuse.statistics.huggingface.backbone_name`
        finds it); names stay the model's full ``state_dict`` names.
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
        The model (or its submodule ``within``) has no ``nn.Linear`` layer, or
        ``within`` names no submodule.
    DataError
        The batches are malformed, or an ``attention_mask`` is not a padding
        mask (values other than 0 and 1, an example without real tokens, or
        0s between real tokens).

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
    sums = gram_sums(model, batches, n_examples=n_examples, within=within, progress=progress)
    return sums.matrices(
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


def linear_layers(
    model: nn.Module, *, within: str | None = None
) -> dict[int, tuple[nn.Linear, list[str]]]:
    """Every ``nn.Linear`` of ``model`` (inside the submodule ``within``) with its weight names.

    Keys are the modules' ids; a layer reachable under several names (shared)
    lists every ``state_dict`` name of its weight, in module order.

    Raises
    ------
    ConfigError
        ``within`` names no submodule, or there is no linear layer.

    Examples
    --------
    >>> model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 1))
    >>> [names for _, names in linear_layers(model).values()]
    [['0.0.weight'], ['1.weight']]
    >>> [names for _, names in linear_layers(model, within="0").values()]
    [['0.0.weight']]
    """
    if within:
        try:
            model.get_submodule(within)
        except AttributeError:
            raise ConfigError(
                f"within: the model has no submodule {within[:60]!r}; give the name of a "
                "module of the model (e.g. 'bert', the backbone of a BERT classifier)"
            ) from None
    layers: dict[int, tuple[nn.Linear, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if within and not (name == within or name.startswith(f"{within}.")):
            continue
        if isinstance(module, nn.Linear):
            weight_name = f"{name}.weight" if name else "weight"
            entry = layers.setdefault(id(module), (module, []))
            entry[1].append(weight_name)
    if not layers:
        where = f"model: its submodule {within[:60]!r}" if within else "model: it"
        raise ConfigError(
            f"{where} has no nn.Linear layer, so there are no Gram matrices to compute; "
            "RegMean merges linear layers only"
        )
    return layers


def gram_sums(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    n_examples: int = 1000,
    within: str | None = None,
    progress: ProgressCallback | None = None,
) -> GramSums:
    """The sums behind :func:`gram_matrices`, before the division by the row counts.

    Takes the same arguments as :func:`gram_matrices`; the sums of shards of
    the data add up (:func:`add_gram_sums`) to the sums of all of it, exactly
    in the number of rows, whatever each example's sequence length.
    """
    return _sums(model, batches, linear_layers(model, within=within), n_examples, progress)


def _sums(
    model: nn.Module,
    batches: Iterable[Any],
    layers: dict[int, tuple[nn.Linear, list[str]]],
    n_examples: int,
    progress: ProgressCallback | None,
) -> GramSums:
    """Gram sums of the given layers only (hooks on those alone)."""
    device = model_device(model)
    sums: dict[int, torch.Tensor] = {}
    rows: dict[int, int] = {}

    mask: list[torch.Tensor | None] = [None]  # the real tokens of the batch running

    def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0].detach()
        keep = mask[0]
        if keep is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(keep.shape):
            x = x[keep]  # rows of padded positions contribute nothing
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
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
                mask[0] = padding_mask(batch.inputs, where=f"batches (after {n_seen} examples)")
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


_MAX_BYTES = 2 * 2**30


@dataclass(frozen=True)
class WrittenStatistics:
    """A statistics file written layer by layer: where, which tensors, over how many examples."""

    path: Path
    names: tuple[str, ...]
    kind: str
    n_examples: int

    def __len__(self) -> int:
        return len(self.names)


def gram_passes(
    model: nn.Module, *, within: str | None = None, max_bytes: int = _MAX_BYTES
) -> list[list[str]]:
    """The linear layers' weight names in groups whose float64 sums fit in ``max_bytes``.

    :func:`write_gram_matrices` makes one pass over the data per group; a
    layer whose sum alone exceeds ``max_bytes`` is a group of its own.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    >>> gram_passes(model, max_bytes=2 * 4 * 4 * 8)
    [['0.weight', '1.weight'], ['2.weight']]
    """
    if max_bytes < 1:
        raise ConfigError(f"max_bytes: expected a positive number of bytes, got {max_bytes}")
    groups: list[list[str]] = []
    used = max_bytes
    for module, names in linear_layers(model, within=within).values():
        size = 8 * module.in_features**2
        if used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(names[0])
        used += size
    return groups


def write_gram_matrices(
    model: nn.Module,
    batches: Iterable[Any],
    path: str | os.PathLike[str],
    *,
    n_examples: int = 1000,
    within: str | None = None,
    max_bytes: int = _MAX_BYTES,
    progress: ProgressCallback | None = None,
) -> WrittenStatistics:
    """Compute the Gram matrices of :func:`gram_matrices` and write them to ``path``, bounded.

    Memory is bounded by ``max_bytes`` of float64 sums, not by the model: the
    linear layers are taken in groups (:func:`gram_passes`) and the data runs
    once per group; each group's matrices are written to the file as soon as
    the group is done and freed, so at no time are all of them held (the file
    is put in place only when complete). With one group, one pass. With several,
    ``batches`` is iterated once per group (an iterator is first read into a
    list).

    Parameters
    ----------
    model, batches, n_examples, within
        As for :func:`gram_matrices`.
    path : path
        The ``.safetensors`` file to write (replaced if it exists).
    max_bytes : int, default 2 GiB
        The float64 sums held at once.
    progress : callable, optional
        Called after each batch with the number of examples processed so far,
        counted over every pass (``passes * n_examples`` in all).

    Returns
    -------
    WrittenStatistics
        The file, the names of the tensors written and the number of examples
        (read the tensors with :func:`modelfuse.statistics.load`).

    Examples
    --------
    >>> import os, tempfile
    >>> from modelfuse.statistics import load
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> x = torch.randn(10, 3)
    >>> file = os.path.join(tempfile.mkdtemp(), "g.safetensors")
    >>> _ = write_gram_matrices(model, [x], file, max_bytes=100)  # one layer per pass
    >>> whole = gram_matrices(model, [x])
    >>> back = load(file)
    >>> all(torch.allclose(back[name], whole[name]) for name in whole)
    True
    """
    from modelfuse.statistics.storage import StatisticsWriter

    groups = gram_passes(model, within=within, max_bytes=max_bytes)
    layers = linear_layers(model, within=within)
    by_name = {names[0]: key for key, (_module, names) in layers.items()}
    if len(groups) > 1 and not isinstance(batches, (list, tuple)):
        batches = list(batches)
    layout = {
        name: ((module.in_features, module.in_features), torch.float32)
        for module, names in layers.values()
        for name in names
    }
    done = 0
    n_seen = 0
    written: list[str] = []
    with StatisticsWriter(path, layout, kind="gram") as writer:
        for group in groups:
            chosen = {by_name[name]: layers[by_name[name]] for name in group}

            def advance(n: int, offset: int = done) -> None:
                if progress is not None:
                    progress(offset + n)

            sums = _sums(model, batches, chosen, n_examples, advance)
            matrices = sums.matrices(stacklevel=3)
            del sums
            for name in list(matrices):
                writer.write(name, matrices.pop(name))
                written.append(name)
            n_seen = matrices.n_examples or 0
            done += n_seen
        writer.n_examples = n_seen
    return WrittenStatistics(Path(path), tuple(written), "gram", n_seen)
