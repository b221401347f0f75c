"""Chunk-sized buffers reused from chunk to chunk by the chunked merges."""

from __future__ import annotations

import torch

__all__ = ["Workspace"]


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
    """

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < length:
            buffer = torch.empty(max(self.size, length), dtype=dtype)
            self._buffers[key] = buffer
        return buffer[:length]

    def zeros(self, key: str, length: int) -> torch.Tensor:
        return self.get(key, length).zero_()
