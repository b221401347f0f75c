"""Statistics files: safetensors keyed by parameter name, with what they hold in the metadata.

The metadata of a file written by :func:`save` says::

    modelfuse.statistics   "fisher" or "gram"
    modelfuse.estimator    "exact" or "empirical" (Fisher only)
    modelfuse.n_examples   the number of examples the statistics were computed on
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

from modelfuse.errors import CheckpointError, ConfigError, OutputError

__all__ = ["Statistics", "StatisticsKind", "StatisticsWriter", "load", "save"]

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
    for name, tensor in stats.items():
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(
                f"statistics entry {name!r} is a {type(tensor).__name__}; expected a tensor"
            )
    layout = {name: (tuple(t.shape), t.dtype) for name, t in stats.items()}
    with StatisticsWriter(path, layout, kind=kind, estimator=estimator) as writer:
        for name, tensor in stats.items():
            writer.write(name, tensor)
        writer.n_examples = n_examples
    return Path(path)


_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class StatisticsWriter:
    """Write a statistics file one tensor at a time, so that none is held once it is written.

    The names, shapes and dtypes of every tensor that *may* be written are
    declared up front; tensors are then appended in any order as they are
    ready (each one is copied to the file and can be freed), and ones never
    written are simply absent. The safetensors header (offsets of the tensors
    written, and the metadata) is written last into space reserved at the start
    of the file, padded with spaces as the format allows. Everything goes to a
    temporary file beside ``path`` that replaces ``path`` only when the writer
    closes without error: an interrupted or failed write leaves nothing behind.

    Parameters
    ----------
    path : path
        The ``.safetensors`` file to write; an existing file is replaced.
    layout : mapping name -> (shape, dtype)
        Every tensor that may be written.
    kind, estimator : optional
        Metadata, as for :func:`save`; ``n_examples`` is set on the writer
        (attribute) before it closes, once it is known.

    Raises
    ------
    ConfigError
        ``kind`` is unknown, a dtype cannot be stored, or a tensor written is
        undeclared, written twice or of another shape or dtype than declared.
    OutputError
        The folder does not exist or the file cannot be written.

    Examples
    --------
    >>> import tempfile, os
    >>> file = os.path.join(tempfile.mkdtemp(), "g.safetensors")
    >>> layout = {"a.weight": ((2, 2), torch.float32), "b.weight": ((3, 3), torch.float32)}
    >>> with StatisticsWriter(file, layout, kind="gram") as writer:
    ...     writer.write("a.weight", torch.eye(2))
    ...     writer.n_examples = 7
    >>> back = load(file)
    >>> sorted(back), back.n_examples, back["a.weight"].tolist()
    (['a.weight'], 7, [[1.0, 0.0], [0.0, 1.0]])
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        layout: Mapping[str, tuple[Sequence[int], torch.dtype]],
        *,
        kind: StatisticsKind | None = None,
        estimator: Literal["exact", "empirical"] | None = None,
    ) -> None:
        if kind is not None and kind not in ("fisher", "gram"):
            raise ConfigError(f"kind: unknown statistics kind {kind!r}; valid: fisher, gram")
        for name, (_shape, dtype) in layout.items():
            if dtype not in _DTYPES:
                raise ConfigError(
                    f"statistics entry {name!r} has dtype {dtype}, which a statistics file "
                    "cannot hold; convert it to float32"
                )
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise OutputError(
                f"{self.path}: the folder {self.path.parent} does not exist; create it or "
                "choose another path"
            )
        self.layout = {
            name: (tuple(int(d) for d in shape), dtype) for name, (shape, dtype) in layout.items()
        }
        self.kind = kind
        self.estimator = estimator
        self.n_examples: int | None = None
        self._written: dict[str, tuple[int, int]] = {}
        self._offset = 0
        # room for the header of every declared tensor, with the longest offsets and metadata
        total = sum(self._size(name) for name in self.layout)
        widest = {name: (total, total) for name in self.layout}
        self._reserved = len(self._header(widest, n_examples=10**20))
        self._reserved += (-self._reserved) % 8
        handle, self._temporary = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        self._file = os.fdopen(handle, "wb")
        try:
            self._file.seek(8 + self._reserved)
        except OSError as exc:
            self._abort()
            raise self._error(exc) from None

    def _size(self, name: str) -> int:
        shape, dtype = self.layout[name]
        count = 1
        for d in shape:
            count *= d
        return count * torch.empty((), dtype=dtype).element_size()

    def _header(self, offsets: Mapping[str, tuple[int, int]], *, n_examples: int | None) -> bytes:
        metadata = {}
        if self.kind is not None:
            metadata[_KIND] = self.kind
        if n_examples is not None:
            metadata[_N] = str(int(n_examples))
        if self.estimator is not None:
            metadata[_ESTIMATOR] = self.estimator
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        for name, (begin, end) in offsets.items():
            shape, dtype = self.layout[name]
            header[name] = {
                "dtype": _DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [begin, end],
            }
        return json.dumps(header, separators=(",", ":")).encode()

    def _error(self, exc: OSError) -> OutputError:
        return OutputError(f"{self.path}: cannot write the statistics ({exc.strerror or exc})")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one declared tensor to the file (a copy is written; ``tensor`` is untouched)."""
        if name not in self.layout:
            raise ConfigError(f"statistics entry {name!r} was not declared to the writer")
        if name in self._written:
            raise ConfigError(f"statistics entry {name!r} is written twice")
        shape, dtype = self.layout[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConfigError(
                f"statistics entry {name!r} is {tensor.dtype} of shape {list(tensor.shape)}; "
                f"declared {dtype} of shape {list(shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        raw = data.view(torch.uint8).numpy() if data.numel() else b""
        try:
            self._file.write(memoryview(raw))
        except OSError as exc:
            raise self._error(exc) from None
        size = data.numel() * data.element_size()
        self._written[name] = (self._offset, self._offset + size)
        self._offset += size

    def close(self) -> Path:
        """Write the header and put the file in place; returns ``path``."""
        header = self._header(self._written, n_examples=self.n_examples)
        if len(header) > self._reserved:  # a count beyond 10**20 examples
            self._abort()
            raise ConfigError(f"n_examples: {self.n_examples!r} is not a count of examples")
        header += b" " * (self._reserved - len(header))
        try:
            self._file.seek(0)
            self._file.write(len(header).to_bytes(8, "little"))
            self._file.write(header)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._temporary, self.path)
        except OSError as exc:
            self._abort()
            raise self._error(exc) from None
        return self.path

    def _abort(self) -> None:
        self._file.close()
        if os.path.exists(self._temporary):
            os.unlink(self._temporary)

    def __enter__(self) -> StatisticsWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self._abort()


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
