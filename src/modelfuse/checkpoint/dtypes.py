"""The element types of the safetensors format and their torch equivalents.

The safetensors header names each tensor's element type with a short code
(``"BF16"``, ``"F32"``, ...). This module maps those codes to
:class:`torch.dtype` and back, for the dtypes the installed torch supports.
"""

from __future__ import annotations

import torch

__all__ = [
    "SAFETENSORS_DTYPES",
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
