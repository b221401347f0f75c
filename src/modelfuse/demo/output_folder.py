"""The demo's output folder: refused when it is something else, replaced only when complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from modelfuse.errors import OutputError

__all__ = ["check_demo_target", "install_folder"]


def check_demo_target(target: Path, marker: str, command: str) -> None:
    """Refuse ``target`` unless it is new or the output of an earlier ``command`` (a folder
    holding ``marker`` and ``report.md``), which the new output then replaces.

    Examples
    --------
    >>> import tempfile
    >>> check_demo_target(Path(tempfile.mkdtemp()) / "new", "results.json", "modelfuse demo")
    """
    existing = next((p for p in target.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OutputError(
            f"{target}: {existing} is a file, not a folder; choose another --out folder"
        )
    if not target.exists():
        return
    if target.is_dir() and (target / marker).is_file() and (target / "report.md").is_file():
        return  # a previous demo's output: replaced once the new one is complete
    raise OutputError(
        f"{target}: exists and is not the output of an earlier `{command}`; "
        "choose another --out folder or remove it"
    )


def install_folder(built: Path, target: Path) -> None:
    """Move the complete folder ``built`` to ``target``, replacing an earlier one."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
