"""The element types of the safetensors format and their torch equivalents.

The safetensors header names each tensor's element type with a short code
(``"BF16"``, ``"F32"``, ...). This module maps those codes to
:class:`torch.dtype` and back, for the dtypes the installed torch supports.
"""

from __future__ import annotations

import torch

__all__ = [
    "FLOAT8_DTYPES",
    "SAFETENSORS_DTYPES",
    "count_nonfinite_float8",
    "dtype_code",
    "itemsize",
]


def _optional(name: str) -> torch.dtype | None:
    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else None


def _build_table() -> dict[str, torch.dtype]:
    table: dict[str, torch.dtype] = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "C64": torch.complex64,
    }
    # Types that only recent torch releases define.
    for code, name in [
        ("U16", "uint16"),
        ("U32", "uint32"),
        ("U64", "uint64"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
    ]:
        dtype = _optional(name)
        if dtype is not None:
            table[code] = dtype
    return table


#: safetensors dtype code -> torch dtype, for every code this module can read and write.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = _build_table()

_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> str | None:
    """Return the safetensors code of ``dtype``, or None if safetensors cannot hold it.

    Examples
    --------
    >>> import torch
    >>> dtype_code(torch.bfloat16)
    'BF16'
    >>> dtype_code(torch.complex128) is None
    True
    """
    return _CODES.get(dtype)


def itemsize(dtype: torch.dtype) -> int:
    """Return the number of bytes of one element of ``dtype``.

    Examples
    --------
    >>> import torch
    >>> itemsize(torch.bfloat16), itemsize(torch.bool), itemsize(torch.float64)
    (2, 1, 8)
    """
    return torch.empty((), dtype=dtype).element_size()


def _float8_limits() -> dict[torch.dtype, int]:
    limits = {}
    # the smallest byte (sign bit cleared) that is NaN or inf: e4m3fn has NaN only (0x7f),
    # e5m2 has inf (0x7c) and NaN (0x7d-0x7f)
    for name, first in [("float8_e4m3fn", 0x7F), ("float8_e5m2", 0x7C)]:
        dtype = _optional(name)
        if dtype is not None:
            limits[dtype] = first
    return limits


_FLOAT8_FIRST_NONFINITE = _float8_limits()
#: The float8 dtypes safetensors stores, which merges compute in float32.
FLOAT8_DTYPES: frozenset[torch.dtype] = frozenset(_FLOAT8_FIRST_NONFINITE)


def count_nonfinite_float8(tensor: torch.Tensor) -> int:
    """The number of NaN and inf entries of a float8 tensor, counted on its bits.

    torch has no min/max or ``isfinite`` kernels for float8; the bit patterns
    say it directly, without a wider copy.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([1.0, float("nan"), -2.0]).to(torch.float8_e4m3fn)
    >>> count_nonfinite_float8(x)
    1
    >>> count_nonfinite_float8(torch.tensor([float("inf"), 3.0]).to(torch.float8_e5m2))
    1
    """
    first = _FLOAT8_FIRST_NONFINITE[tensor.dtype]
    bits = tensor.detach().contiguous().view(torch.uint8)
    return int(torch.count_nonzero(torch.bitwise_and(bits, 0x7F) >= first))
