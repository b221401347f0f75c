"""Helpers shared by the checkpoint tests (conftest puts this folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Small tensors covering every dtype safetensors and modelfuse support."""
    g = torch.Generator().manual_seed(seed)
    floats = torch.randn(4, 6, generator=g)
    tensors = {
        "embed.weight": floats.to(torch.bfloat16),
        "layers.0.attn.q.weight": torch.randn(6, 6, generator=g).to(torch.float16),
        "layers.0.attn.q.bias": torch.randn(6, generator=g),
        "layers.0.norm.weight": torch.randn(3, 5, generator=g).to(torch.float64),
        "counts": torch.randint(-1000, 1000, (7,), generator=g),
        "index32": torch.randint(-1000, 1000, (2, 3), generator=g, dtype=torch.int32),
        "index16": torch.randint(-1000, 1000, (5,), generator=g, dtype=torch.int16),
        "small": torch.randint(-100, 100, (3,), generator=g, dtype=torch.int8),
        "bytes": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "mask": torch.rand(2, 5, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "fp8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
        "fp8b": torch.randn(8, generator=g).to(torch.float8_e5m2),
        "complex": torch.randn(3, generator=g, dtype=torch.complex64),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16),
        "u32": torch.tensor([0, 7, 2**31], dtype=torch.int64).to(torch.uint32),
        "u64": torch.tensor([0, 9, 2**62], dtype=torch.int64).to(torch.uint64),
    }
    return tensors


def bits(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, for bit-exact comparisons (NaN-safe, dtype-agnostic)."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert tuple(actual.shape) == tuple(expected.shape)
    assert bits(actual) == bits(expected)


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary or backup folders a writer left beside ``parent / name``."""
    return sorted(
        p.name for p in parent.iterdir() if p.name.startswith((f".{name}.tmp-", f".{name}.old-"))
    )
