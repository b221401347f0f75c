"""Where a merge may write: never over anything that is, holds or configures an input."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from modelfuse.errors import OutputError
from modelfuse.merge.parameters import short

__all__ = ["check_output_path", "expand_user"]


def expand_user(reference: str, *, key: str) -> Path:
    """``Path(reference).expanduser()``, with a one-line error for an unknown ``~user``.

    Examples
    --------
    >>> expand_user("~nosuchuser-for-modelfuse/m", key="models[0].model")
    Traceback (most recent call last):
    ...
    modelfuse.errors.ConfigError: models[0].model: '~nosuchuser-for-modelfuse/m': no such user \
'nosuchuser-for-modelfuse' for '~'; give the path without '~user' or with an existing user
    """
    try:
        return Path(reference).expanduser()
    except RuntimeError:
        from modelfuse.errors import ConfigError

        user = reference[1:].split("/", 1)[0].split(os.sep, 1)[0]
        raise ConfigError(
            f"{key}: {short(reference)}: no such user {short(user)} for '~'; give the path "
            "without '~user' or with an existing user"
        ) from None


def _real(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(path))


def _holds(folder: str, path: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_path(
    out: str | os.PathLike[str],
    inputs: Iterable[tuple[str, str | os.PathLike[str]]],
    *,
    overwrite: bool,
    flag: str = "OUT",
) -> None:
    """Refuse an output that exists (without ``overwrite``) or that is or holds an input.

    Paths are compared after resolving symbolic links, so a link to an input
    is the input.

    Parameters
    ----------
    out : path
        The output folder.
    inputs : iterable of (what, path)
        Every input (models, statistics, patches, the configuration file and
        its folder), ``what`` naming it in the message (``"input model"``).
    overwrite : bool
        Whether an existing ``out`` may be replaced.
    flag : str, default "OUT"
        How the message names the output.

    Raises
    ------
    OutputError
        ``out`` exists without ``overwrite``, or it is an input or contains one.
    """
    if not os.path.lexists(out):
        return
    real = _real(out)
    inputs = list(inputs)
    same = [(what, path) for what, path in inputs if _real(path) == real]
    inside = [(what, path) for what, path in inputs if _holds(real, _real(path))]
    for relation, found in (("is", same), ("contains", inside)):
        if found:
            what, path = found[0]
            raise OutputError(
                f"{out}: {relation} the {what} {short(str(path), 200)}; writing {flag} there "
                "would destroy an input; choose another output folder"
            )
    if not overwrite:
        raise OutputError(
            f"{out}: already exists; choose another output folder, or pass --overwrite "
            "to replace it"
        )
