"""Writing a command's output without ever leaving it half-written.

Shared by ``modelfuse calibrate``, ``calibration-report``, ``ensemble`` and
``compare``: refuse an existing output unless ``--overwrite``, write into a
temporary file or folder beside the target, and ``os.replace`` it into place
only once it is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from modelfuse.errors import ConfigError, OutputError

__all__ = [
    "check_folder_output",
    "check_output",
    "current_umask",
    "publish_folder",
    "refuse_existing",
    "refuse_output_over_inputs",
    "require_parent_folder",
    "staging_folder",
    "write_atomically",
    "write_json",
]


def refuse_existing(out: Path, *, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise OutputError(
            f"{out}: already exists; remove it, choose another -o, or pass --overwrite"
        )


def refuse_output_over_inputs(out: Path, inputs: Mapping[str, Path | str | None]) -> None:
    """Refuse an ``out`` that is one of the inputs or a folder holding one.

    ``--overwrite`` replaces ``out`` only, never an input: without this check
    it would delete the very files the command reads. ``inputs`` maps how
    the command line named an input (``"--predictions a"``) to its path; a
    ``FILE.npz:KEY`` names its ``.npz``. Symbolic links are resolved.

    Raises
    ------
    OutputError
        Naming the first input found at or under ``out``.
    """
    target = out.resolve()
    for described, path in inputs.items():
        if path is None:
            continue
        text = str(path)
        if ".npz:" in text:
            text = text.rsplit(".npz:", 1)[0] + ".npz"
        resolved = Path(text).resolve()
        if resolved == target or target in resolved.parents:
            relation = "is" if resolved == target else "holds"
            raise OutputError(
                f"{out}: {relation} the input of {described}; choose another -o "
                "(--overwrite never replaces an input)"
            )


def require_parent_folder(out: Path) -> None:
    """Refuse an ``out`` whose folder does not exist."""
    if not out.resolve().parent.is_dir():
        raise OutputError(f"{out}: the folder {out.parent} does not exist; create it first")


def check_output(out: Path, *, suffix: str, overwrite: bool) -> None:
    """Refuse an existing output (unless ``overwrite``) or a wrong file type, before any work."""
    if out.suffix.lower() != suffix:
        raise ConfigError(f"{out}: the output must be a {suffix} file; name it OUT{suffix}")
    refuse_existing(out, overwrite=overwrite)
    if out.exists() and out.is_dir():
        raise OutputError(f"{out}: is a folder; choose a file name for -o")
    require_parent_folder(out)


def check_folder_output(out: Path, *, overwrite: bool) -> None:
    """Refuse an existing output folder (unless ``overwrite``) or an existing file, before any work."""
    refuse_existing(out, overwrite=overwrite)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another -o")


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(out: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write(handle)`` into a temporary file beside ``out``, then rename it."""
    handle, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(
            f"{out}: cannot write ({exc.strerror or exc}); nothing was written"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(out: Path, value: dict[str, Any]) -> None:
    """Write ``value`` as indented JSON to ``out``, atomically."""
    text = json.dumps(value, indent=2, allow_nan=True) + "\n"
    write_atomically(out, lambda stream: stream.write(text.encode()))


def staging_folder(out: Path) -> Path:
    """A new, empty, private folder beside ``out`` to build the output in."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent))


def publish_folder(staging: Path, out: Path) -> None:
    """Give ``staging`` the usual permissions and move it to ``out``, replacing a previous ``out``.

    The previous folder is moved aside first and removed only after the new
    one is in place.
    """
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700; a report folder is not
    if out.exists():
        parent = out.resolve().parent
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
