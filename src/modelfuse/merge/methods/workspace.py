"""Chunk-sized buffers reused from chunk to chunk by the chunked merges."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

__all__ = ["TRANSIENT", "Workspace"]

_T = TypeVar("_T")

TRANSIENT = "transient"
"""The key of a buffer that any stage of a chunk may use for values it has consumed
before it returns or calls another stage (the norm pass's magnitudes, DELLA's picked
keys): one buffer for all of them keeps the chunk's working set small."""


class Workspace:
    """Chunk-sized buffers reused from chunk to chunk.

    Few, reused allocations keep the allocator's heap small: freed chunk-sized
    temporaries interleaved with the engine's large tensors fragment it, and
    depending on the allocator's state each fresh one may be new memory from
    the system, whose every page faults on first use.

    Examples
    --------
    >>> space = Workspace(1024)
    >>> a = space.get("keys", 100, torch.int32)
    >>> space.get("keys", 200, torch.int32).data_ptr() == a.data_ptr()  # the same buffer
    True
    >>> space.get("keys", 200, torch.float32).data_ptr() == a.data_ptr()  # the same bytes
    True
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._buffers: dict[str, torch.Tensor] = {}
        self._derived: dict[Hashable, Any] = {}

    def get(self, key: str, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``length`` entries of buffer ``key`` as ``dtype``.

        Dtypes of one size share the buffer's memory (a float32 and an int32 request
        of one key get the same bytes), so stages that never overlap in time can
        share a key and keep the chunk's working set small.
        """
        buffer = self._buffers.get(key)
        if buffer is None or buffer.dtype.itemsize != dtype.itemsize or buffer.numel() < length:
            buffer = torch.empty(max(self.size, length), dtype=dtype)
            self._buffers[key] = buffer
            self._derived.clear()  # they may be views of the buffer this one replaces
        part = buffer[:length]
        return part if buffer.dtype == dtype else part.view(dtype)

    def zeros(self, key: str, length: int) -> torch.Tensor:
        return self.get(key, length).zero_()

    def derived(self, key: Hashable, make: Callable[[], _T]) -> _T:
        """What ``make()`` builds from this workspace's buffers (views of them shaped for
        a chunk, constants), built once per ``key`` and kept until a buffer is replaced,
        so that chunk after chunk skips building them again.

        Examples
        --------
        >>> space = Workspace(8)
        >>> grid = space.derived(("grid", 2), lambda: space.get("a", 8).view(2, 4))
        >>> space.derived(("grid", 2), lambda: None) is grid
        True
        """
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = make()
        return value
