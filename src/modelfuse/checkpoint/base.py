"""What every checkpoint reader offers: tensor names, their metadata and their data.

A :class:`Checkpoint` is opened lazily: opening reads headers only (names,
shapes, dtypes), and :meth:`Checkpoint.read` reads one tensor at a time, so a
merge holds a few tensors in memory rather than whole models.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from modelfuse.checkpoint.dtypes import FLOAT8_DTYPES, count_nonfinite_float8
from modelfuse.checkpoint.names import tensor_label
from modelfuse.errors import CheckpointError

__all__ = [
    "Checkpoint",
    "TensorInfo",
]


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape, dtype and location of one tensor of a checkpoint.

    Attributes
    ----------
    name : str
        The tensor's name (state-dict key).
    shape : tuple of int
        Its shape; ``()`` for a scalar.
    dtype : torch.dtype
        Its element type.
    nbytes : int
        The size of its data in bytes (number of elements times item size).
    file : Path
        The file that holds it (one shard of a sharded checkpoint).

    Examples
    --------
    >>> import torch
    >>> from pathlib import Path
    >>> info = TensorInfo("w", (2, 3), torch.float16, 12, Path("model.safetensors"))
    >>> info.nbytes // 6
    2
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    file: Path


class Checkpoint(abc.ABC):
    """A lazily opened set of named tensors (abstract base; one subclass per format).

    Subclasses fill ``self._infos`` (name -> :class:`TensorInfo`, in file
    order) when opened and implement :meth:`read` and :meth:`close`.

    Attributes
    ----------
    path : Path
        What the user gave: a file, an index file or a folder.
    folder : Path or None
        The model folder whose non-weight files (``config.json``, tokenizer
        files, ...) belong with these weights, or None when there is none.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from modelfuse.checkpoint import open_checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> save_file({"w": torch.ones(2, 2)}, path)
    >>> with open_checkpoint(path) as ckpt:
    ...     print(ckpt.keys(), ckpt.info("w").shape, ckpt.read("w").sum().item())
    ['w'] (2, 2) 4.0
    """

    path: Path
    folder: Path | None

    def __init__(self, path: Path, folder: Path | None) -> None:
        self.path = path
        self.folder = folder
        self._infos: dict[str, TensorInfo] = {}

    def keys(self) -> list[str]:
        """Return the tensor names, in file order (shard by shard, by data offset)."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        """Return the name, shape, dtype, size and file of tensor ``name``.

        Raises
        ------
        CheckpointError
            The checkpoint has no tensor of that name.
        """
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(self._missing_message(name)) from None

    def _missing_message(self, name: str) -> str:
        near = [key for key in self._infos if key.endswith(name) or name.endswith(key)][:3]
        hint = f"; similar names: {', '.join(near)}" if near else ""
        return (
            f"{self.path}: no tensor named {name!r}; the checkpoint holds "
            f"{len(self._infos)} tensors{hint}; check the tensor name or the checkpoint path"
        )

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._infos))

    @abc.abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` as a fresh CPU tensor owned by the caller.

        Safe to call from several threads at once.

        Raises
        ------
        CheckpointError
            The checkpoint has no tensor of that name, its data cannot be read,
            or it is a float8 tensor holding NaN or inf values.
        """

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Return rows ``start:stop`` (along the first dimension) of tensor ``name``.

        Lets a caller process a large tensor (an embedding matrix) in blocks,
        so that memory is bounded by the block, not the tensor. Subclasses
        read only the bytes of those rows. Safe to call from several threads.

        Raises
        ------
        CheckpointError
            The checkpoint has no tensor of that name.
        ValueError
            The tensor is a scalar, or ``0 <= start <= stop <= shape[0]`` fails.

        Examples
        --------
        >>> import os, tempfile, torch
        >>> from safetensors.torch import save_file
        >>> from modelfuse.checkpoint import open_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> save_file({"w": torch.arange(12.0).reshape(4, 3)}, path)
        >>> with open_checkpoint(path) as ckpt:
        ...     ckpt.read_rows("w", 1, 3).tolist()
        [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
        """
        self._check_rows(name, start, stop)
        return self.read(name)[start:stop].clone()

    def _check_rows(self, name: str, start: int, stop: int) -> TensorInfo:
        info = self.info(name)
        if not info.shape:
            raise ValueError(f"{self.path}: tensor {name!r} is a scalar and has no rows")
        if not 0 <= start <= stop <= info.shape[0]:
            raise ValueError(
                f"{self.path}: tensor {name!r}: rows {start}:{stop} are outside its "
                f"{info.shape[0]} rows"
            )
        return info

    def _checked(self, info: TensorInfo, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as read, after refusing NaN or inf in a float8 tensor."""
        if info.dtype in FLOAT8_DTYPES:
            count = count_nonfinite_float8(tensor)
            if count:
                raise CheckpointError(
                    f"{info.file}: tensor {tensor_label(info.name)} "
                    f"({str(info.dtype).removeprefix('torch.')}) holds {count} "
                    "NaN or inf values, which a merge would spread; expected finite values; "
                    "quantize the model again with saturation"
                )
        return tensor

    @abc.abstractmethod
    def close(self) -> None:
        """Release open files; further reads raise. Idempotent."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, tensors={len(self._infos)})"
