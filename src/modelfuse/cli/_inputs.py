"""How every command names its input files: ``NAME=FILE`` or plain ``FILE``.

``--predictions`` (and any option taking several files) accepts both forms,
repeated (``-p a.npy -p b.npy``) or space-separated after one flag
(``-p a.npy b.npy``). A plain file is named after its file name without the
suffix (``FILE.npz:KEY`` after ``KEY``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from modelfuse.errors import ConfigError

__all__ = ["file_name", "named_files"]


def file_name(path: str) -> str:
    """The name a plain input file goes by: its stem, or ``KEY`` of ``FILE.npz:KEY``.

    Examples
    --------
    >>> file_name("runs/soup.npy"), file_name("preds.npz:ties")
    ('soup', 'ties')
    """
    if ".npz:" in path:
        return path.rsplit(".npz:", 1)[1]
    return Path(path).stem


def named_files(items: Iterable[str], *, option: str = "--predictions") -> dict[str, str]:
    """Parse ``NAME=FILE`` or ``FILE`` items into an ordered ``{name: file}`` mapping.

    Raises
    ------
    ConfigError
        An item is empty or ``NAME=`` without a file, or two items share a name.

    Examples
    --------
    >>> named_files(["soup=a.npy", "b.npy", "c.npz:ties"])
    {'soup': 'a.npy', 'b': 'b.npy', 'ties': 'c.npz:ties'}
    """
    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = "", item
        name, path = name.strip(), path.strip()
        if not path or (sep and not name):
            raise ConfigError(
                f"{option} {item[:80]!r}: expected NAME=FILE or FILE, "
                f"e.g. {option} fused=fused_probs.npy"
            )
        name = name or file_name(path)
        if name in named:
            raise ConfigError(
                f"{option}: the name {name[:80]!r} is given twice ({named[name][:80]} and "
                f"{path[:80]}); give every input its own name, as NAME=FILE"
            )
        named[name] = path
    return named
