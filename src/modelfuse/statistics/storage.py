"""Statistics files: safetensors keyed by parameter name, with what they hold in the metadata.

The metadata of a file written by :func:`save` says::

    modelfuse.statistics   "fisher" or "gram"
    modelfuse.estimator    "exact" or "empirical" (Fisher only)
    modelfuse.n_examples   the number of examples the statistics were computed on
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from modelfuse.errors import CheckpointError, ConfigError, OutputError

__all__ = ["Statistics", "StatisticsKind", "load", "save"]

StatisticsKind = Literal["fisher", "gram"]

_KIND = "modelfuse.statistics"
_ESTIMATOR = "modelfuse.estimator"
_N = "modelfuse.n_examples"


class Statistics(dict[str, torch.Tensor]):
    """A dict ``parameter name -> Tensor`` that also says what it holds.

    Parameters
    ----------
    tensors : mapping name -> Tensor
        The statistics, keyed by the model's ``state_dict`` names.
    kind : {"fisher", "gram"} or None
        Fisher diagonals or Gram matrices of linear layers' inputs; None for a
        file written by another tool.
    n_examples : int or None
        The number of examples they were computed on.
    estimator : {"exact", "empirical"} or None
        For Fisher diagonals, which estimator.

    Examples
    --------
    >>> s = Statistics({"w": torch.ones(2)}, kind="fisher", n_examples=8, estimator="exact")
    >>> s.kind, s.n_examples, list(s)
    ('fisher', 8, ['w'])
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        kind: StatisticsKind | None,
        n_examples: int | None,
        estimator: Literal["exact", "empirical"] | None = None,
    ) -> None:
        super().__init__(tensors)
        self.kind = kind
        self.n_examples = n_examples
        self.estimator = estimator

    def __repr__(self) -> str:
        return (
            f"Statistics(kind={self.kind!r}, estimator={self.estimator!r}, "
            f"n_examples={self.n_examples!r}, tensors={len(self)})"
        )


def save(
    stats: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    kind: StatisticsKind | None = None,
    n_examples: int | None = None,
    estimator: Literal["exact", "empirical"] | None = None,
) -> Path:
    """Write statistics to a safetensors file, atomically.

    The tensors go to a temporary file beside ``path`` that is renamed into
    place only once it is complete, so an interrupted write leaves nothing
    behind and never a half-written file.

    Parameters
    ----------
    stats : mapping name -> Tensor
        As returned by :func:`~modelfuse.statistics.fisher_diagonal` or
        :func:`~modelfuse.statistics.gram_matrices`. Not modified.
    path : path
        The file to write (``.safetensors``); an existing file is replaced.
    kind, n_examples, estimator : optional
        Metadata; taken from ``stats`` when it is a :class:`Statistics`.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ConfigError
        ``kind`` is unknown.
    OutputError
        The folder does not exist or the file cannot be written.

    Examples
    --------
    >>> import tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> file = save({"w": torch.ones(2)}, os.path.join(folder, "f.safetensors"),
    ...             kind="fisher", n_examples=3)
    >>> back = load(file)
    >>> back.kind, back.n_examples, back["w"]
    ('fisher', 3, tensor([1., 1.]))
    """
    if isinstance(stats, Statistics):
        kind = kind if kind is not None else stats.kind
        n_examples = n_examples if n_examples is not None else stats.n_examples
        estimator = estimator if estimator is not None else stats.estimator
    if kind is not None and kind not in ("fisher", "gram"):
        raise ConfigError(f"kind: unknown statistics kind {kind!r}; valid: fisher, gram")
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(
            f"{path}: the folder {path.parent} does not exist; create it or choose another path"
        )
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in stats.items():
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(
                f"statistics entry {name!r} is a {type(tensor).__name__}; expected a tensor"
            )
        out = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing memory (tied weights): give each its own copy.
        pointer = out.untyped_storage().data_ptr()
        if pointer in seen:
            out = out.clone()
        seen.add(out.untyped_storage().data_ptr())
        tensors[name] = out
    metadata = {}
    if kind is not None:
        metadata[_KIND] = kind
    if n_examples is not None:
        metadata[_N] = str(int(n_examples))
    if estimator is not None:
        metadata[_ESTIMATOR] = estimator
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the statistics ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def load(path: str | os.PathLike[str]) -> Statistics:
    """Read a statistics file written by :func:`save` (or any safetensors file).

    Parameters
    ----------
    path : path
        A ``.safetensors`` file.

    Returns
    -------
    Statistics
        The tensors, with ``kind``, ``n_examples`` and ``estimator`` from the
        metadata (None when the file does not say).

    Raises
    ------
    CheckpointError
        The file is missing or not a safetensors file.

    Examples
    --------
    >>> import tempfile, os
    >>> file = os.path.join(tempfile.mkdtemp(), "g.safetensors")
    >>> _ = save({"fc.weight": torch.eye(2)}, file, kind="gram", n_examples=10)
    >>> load(file)
    Statistics(kind='gram', estimator=None, n_examples=10, tensors=1)
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such statistics file; compute one with `modelfuse statistics`"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); give a file written by "
            "`modelfuse statistics` or modelfuse.statistics.save"
        ) from None
    kind = metadata.get(_KIND)
    if kind not in ("fisher", "gram"):
        kind = None
    estimator = metadata.get(_ESTIMATOR)
    if estimator not in ("exact", "empirical"):
        estimator = None
    n_text = metadata.get(_N)
    n_examples = int(n_text) if n_text is not None and n_text.isdigit() else None
    return Statistics(tensors, kind=kind, n_examples=n_examples, estimator=estimator)
