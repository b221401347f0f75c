"""Tensor names and values read from files, as error messages show them.

Whatever a checkpoint holds is data from a stranger: a name may be megabytes
long or hold a lone surrogate (a ``\\ud800`` escape in a JSON header) that
cannot be printed or written as UTF-8. Messages show such values escaped to
ASCII and bounded in length.
"""

from __future__ import annotations

import reprlib

from modelfuse.errors import CheckpointError

__all__ = [
    "check_name",
    "json_reason",
    "preview",
    "tensor_label",
]

_PREVIEW = reprlib.Repr()
_PREVIEW.maxlevel, _PREVIEW.maxlist, _PREVIEW.maxdict, _PREVIEW.maxlong = 3, 8, 4, 40
_PREVIEW.maxstring, _PREVIEW.maxother = 40, 40


def preview(value: object) -> str:
    r"""A short, bounded, ASCII rendering of any value read from a file, for messages.

    Examples
    --------
    >>> preview([[[[1]]]])
    '[[[[...]]]]'
    >>> preview(list(range(100)))
    '[0, 1, 2, 3, 4, 5, 6, 7, ...]'
    >>> print(preview("w\ud800"))
    'w\ud800'
    """
    text = _PREVIEW.repr(value).encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= 80 else text[:77] + "..."


def tensor_label(name: str) -> str:
    r"""A tensor name as messages show it: quoted, escaped to ASCII, at most 80 characters.

    Examples
    --------
    >>> print(tensor_label("model.w"), tensor_label("w\ud800"))
    'model.w' 'w\ud800'
    """
    text = ascii(name)
    return text if len(text) <= 80 else text[:76] + "...'"


def check_name(name: str, where: str, fix: str) -> None:
    r"""Refuse a tensor name that is not valid Unicode (a lone surrogate from a ``\ud800`` escape).

    Such a name cannot be written as UTF-8, so no safetensors file, index or
    Hugging Face tool can hold it.

    Parameters
    ----------
    name : str
        The tensor name as read.
    where : str
        The file it was read from, which starts the message.
    fix : str
        What the user should do, which ends the message.

    Raises
    ------
    CheckpointError
        Naming the tensor in escaped form, the problem and ``fix``.

    Examples
    --------
    >>> check_name("model.w", "m.safetensors", "rename it")
    >>> try:
    ...     check_name("w\ud800", "m.safetensors", "rename it")
    ... except CheckpointError as exc:
    ...     print(exc)
    m.safetensors: tensor name 'w\ud800' is not valid Unicode (it holds a lone surrogate), so no safetensors file can store it; rename it
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(
            f"{where}: tensor name {tensor_label(name)} is not valid Unicode (it holds a lone "
            f"surrogate), so no safetensors file can store it; {fix}"
        ) from None


def json_reason(exc: Exception) -> str:
    """Why :func:`json.loads` refused a text, in at most 120 ASCII characters.

    Examples
    --------
    >>> import json
    >>> try:
    ...     json.loads("[" + "9" * 5000 + "]")
    ... except ValueError as exc:
    ...     print(json_reason(exc))
    an integer of more than 4300 digits
    """
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if text.startswith("Exceeds the limit"):
        return "an integer of more than 4300 digits"
    return ascii(text)[1:121]
