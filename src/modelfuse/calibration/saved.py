"""Checking values read from saved (JSON) calibrators and ensembles.

A saved file may come from anywhere: every value is checked for its type,
range and shape before use, and a bad one is refused with a
:class:`~modelfuse.errors.ConfigError` that names its key (``"state.coef_"``),
what was expected and what was found (shortened), never a ``KeyError`` or
``TypeError``. Arrays must hold finite numbers; JSON's ``NaN`` and
``Infinity`` are refused.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from modelfuse.errors import ConfigError

__all__ = [
    "saved_array",
    "saved_choice",
    "saved_field",
    "saved_integer",
    "saved_mapping",
    "saved_number",
    "shown",
]


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages.

    Examples
    --------
    >>> shown("x" * 100, limit=10)
    "'xxxxxx..."
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def saved_mapping(value: Any, key: str) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else a ConfigError naming ``key``.

    Examples
    --------
    >>> saved_mapping([1], "state")
    Traceback (most recent call last):
    ...
    modelfuse.errors.ConfigError: "state": expected an object, got a list
    """
    if not isinstance(value, dict):
        raise ConfigError(f'"{key}": expected an object, got {_type_name(value)}')
    return value


def saved_field(mapping: Mapping[str, Any], name: str, key: str) -> Any:
    """``mapping[name]``, or a ConfigError saying that ``key`` is missing.

    Examples
    --------
    >>> saved_field({}, "coef_", "state.coef_")
    Traceback (most recent call last):
    ...
    modelfuse.errors.ConfigError: "state.coef_": missing
    """
    if name not in mapping:
        raise ConfigError(f'"{key}": missing')
    return mapping[name]


def saved_choice(value: Any, key: str, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices``.

    Examples
    --------
    >>> saved_choice("logit", "params.kind", ("probabilities", "logits"))
    Traceback (most recent call last):
    ...
    modelfuse.errors.ConfigError: "params.kind": expected one of 'probabilities', 'logits', got 'logit'
    """
    if isinstance(value, (dict, list)) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f'"{key}": expected one of {listed}, got {shown(value)}')
    return value


def saved_integer(value: Any, key: str, *, low: int, high: int) -> int:
    """``value`` if it is an integer in ``[low, high]`` (a float such as ``3.0`` is not).

    Examples
    --------
    >>> saved_integer(3, "n_classes", low=2, high=10)
    3
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        ok = False
    else:
        ok = low <= value <= high
    if not ok:
        raise ConfigError(f'"{key}": expected an integer in [{low}, {high}], got {shown(value)}')
    return int(value)


def saved_number(
    value: Any, key: str, *, low: float = -math.inf, high: float = math.inf, open_low: bool = False
) -> float:
    """``value`` as a float if it is a finite number in ``[low, high]`` (``(low, high]`` if ``open_low``).

    Examples
    --------
    >>> saved_number(float("nan"), "state.temperature_", low=0, open_low=True)
    Traceback (most recent call last):
    ...
    modelfuse.errors.ConfigError: "state.temperature_": expected a finite number in (0, inf], got nan
    """
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if ok:
        number = float(value)
        ok = math.isfinite(number) and (low < number if open_low else low <= number)
        ok = ok and number <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ConfigError(
            f'"{key}": expected a finite number in {bracket}{low:g}, {high:g}], got {shown(value)}'
        )
    return float(value)


def saved_array(
    value: Any,
    key: str,
    *,
    shape: tuple[int | None, ...],
    low: float = -math.inf,
    high: float = math.inf,
) -> np.ndarray:
    """``value`` (nested lists of numbers) as a finite float64 array of ``shape``.

    ``None`` in ``shape`` accepts any length (at least 1) on that axis. The
    ``{"array": [...], "dtype": "float64"}`` form that
    :meth:`modelfuse.calibration.Calibrator.to_json` writes is accepted too.

    Examples
    --------
    >>> saved_array([1, 2.5], "state.coef_", shape=(2,))
    array([1. , 2.5])
    >>> saved_array([[1, 2]], "state.coef_", shape=(2, 2))
    Traceback (most recent call last):
    ...
    modelfuse.errors.ConfigError: "state.coef_": expected shape (2, 2), got (1, 2)
    """
    if isinstance(value, dict) and set(value) == {"array", "dtype"}:
        saved_choice(value["dtype"], f"{key}.dtype", ("float64", "float32", "int64"))
        value = value["array"]
    if not isinstance(value, list):
        raise ConfigError(f'"{key}": expected a list of numbers, got {_type_name(value)}')
    array = None
    if _numbers_only(value):
        try:
            array = np.asarray(value)
        except (ValueError, TypeError):
            array = None
    if array is None or array.dtype.kind not in "iuf":
        raise ConfigError(
            f'"{key}": expected a list of numbers of shape {_shape_text(shape)}, '
            "got a list that is ragged, nested too deeply, or holds strings, booleans, "
            "objects or nulls"
        )
    array = array.astype(np.float64)
    wanted = len(shape) == array.ndim and all(
        (n is None and m >= 1) or n == m for n, m in zip(shape, array.shape, strict=True)
    )
    if not wanted:
        raise ConfigError(f'"{key}": expected shape {_shape_text(shape)}, got {array.shape}')
    if not np.isfinite(array).all():
        raise ConfigError(f'"{key}": holds NaN or infinite values; expected finite numbers')
    if array.size and (array.min() < low or array.max() > high):
        raise ConfigError(
            f'"{key}": expected values in [{low:g}, {high:g}], got values in '
            f"[{array.min():.4g}, {array.max():.4g}]"
        )
    return array


def _numbers_only(value: list[Any]) -> bool:
    """Whether nested lists hold ints and floats only (no bool, str, None or dict); no recursion."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            return False
    return True


def _shape_text(shape: tuple[int | None, ...]) -> str:
    parts = ["n" if n is None else str(n) for n in shape]
    return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"
