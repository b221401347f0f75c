"""Byte sizes written by people: ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1048576"``."""

from __future__ import annotations

import re

from modelfuse.errors import ConfigError

__all__ = [
    "parse_size",
]

#: Decimal units as Hugging Face uses them (5GB = 5 * 10**9), binary ones with "i".
UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a size in bytes: ``"5GB"`` is 5_000_000_000 (decimal, as Hugging Face).

    Parameters
    ----------
    text : str or int
        A positive number of bytes, optionally with a unit: B, KB, MB, GB, TB
        (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024); case does not
        matter, the final B may be left out.

    Returns
    -------
    int
        The size in bytes, at least 1.

    Raises
    ------
    ConfigError
        The text is not a positive size with a known unit.

    Examples
    --------
    >>> parse_size("5GB"), parse_size("2GiB"), parse_size("500mb"), parse_size(1048576)
    (5000000000, 2147483648, 500000000, 1048576)
    """
    value: float
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str) and (match := _SIZE.match(text)):
        unit = match.group(2).upper()
        if unit not in UNITS:
            raise ConfigError(_message(text, f"unknown unit {match.group(2)!r}"))
        value = float(match.group(1)) * UNITS[unit]
    else:
        raise ConfigError(_message(text, "not a size"))
    size = int(value)
    if size < 1:
        raise ConfigError(_message(text, "not positive"))
    return size


def _message(text: object, problem: str) -> str:
    return (
        f"size {text!r}: {problem}; expected a positive number of bytes with an optional unit, "
        "such as '5GB', '500MB', '2GiB' or '1048576'"
    )
