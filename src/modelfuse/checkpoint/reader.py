"""Opening a checkpoint from whatever path the user gives.

:func:`open_checkpoint` accepts a ``.safetensors`` file, a sharded
safetensors checkpoint (its folder or its ``model.safetensors.index.json``),
a Hugging Face model folder (``config.json`` beside the weights; safetensors
preferred over ``.bin`` when both exist), a PyTorch ``.bin``/``.pt``/``.pth``
file, or a sharded ``.bin`` checkpoint (``pytorch_model.bin.index.json``).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from modelfuse.checkpoint.base import Checkpoint
from modelfuse.checkpoint.index import read_index
from modelfuse.checkpoint.names import preview
from modelfuse.checkpoint.safetensors_format import SafetensorsCheckpoint
from modelfuse.checkpoint.torch_format import TorchCheckpoint
from modelfuse.errors import CheckpointError

__all__ = [
    "open_checkpoint",
]

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: Files a Hugging Face Trainer saves beside the weights that are not weights.
NOT_WEIGHTS = frozenset(
    {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"}
)
_EXPECTED = (
    "expected a .safetensors file, a .bin/.pt file, a *.index.json shard index "
    "or a model folder holding one of those"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint lazily: read its headers, no tensor data yet.

    Parameters
    ----------
    path : str or path-like
        A ``.safetensors`` file; a ``model.safetensors.index.json`` or the
        folder holding it and its shards; a Hugging Face model folder; a
        PyTorch ``.bin``/``.pt``/``.pth`` file (loaded with
        ``weights_only=True``; a nested ``state_dict`` is unwrapped); or a
        ``pytorch_model.bin.index.json`` or its folder. Only local paths:
        modelfuse does not download models.

    Returns
    -------
    Checkpoint
        Close it (or use it in a ``with`` block) when done. Its ``folder`` is
        the model folder (the path itself, or a file's folder when it holds a
        ``config.json``), whose non-weight files go with the weights.

    Raises
    ------
    CheckpointError
        The path does not exist (or is a Hub id, which modelfuse does not
        download), holds no weights, is not a checkpoint, or is corrupt.

    Examples
    --------
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_file({"w": torch.ones(3)}, str(folder / "model.safetensors"))
    >>> with open_checkpoint(folder) as ckpt:
    ...     ckpt.info("w").shape, ckpt.folder == folder
    ((3,), True)
    """
    text = os.fspath(path)
    given = Path(text).expanduser()
    if not given.exists():
        raise CheckpointError(_missing_message(text, given))
    if given.is_dir():
        return _open_folder(given)
    parent = given.parent
    folder = parent if (parent / "config.json").is_file() else None
    return _open_file(given, folder)


def _missing_message(text: str, given: Path) -> str:
    remote = text.startswith(("hf://", "http://", "https://")) or (
        _HUB_ID.match(text) is not None and not given.parent.exists()
    )
    if remote:
        name = text.rstrip("/").rsplit("/", 1)[-1]
        return (
            f"{text}: no such local file or folder; it looks like a model on the Hugging Face "
            "Hub, and modelfuse does not download models: download it first (e.g. "
            f"`hf download {text} --local-dir ./{name}`) and pass the local folder"
        )
    return f"{text}: no such file or folder; {_EXPECTED}; check the path"


def _open_file(path: Path, folder: Path | None, given: Path | None = None) -> Checkpoint:
    given = path if given is None else given
    if path.name.endswith(".index.json"):
        return _open_index(path, given, folder)
    suffix = path.suffix.lower()
    kind = _sniff(path) if suffix not in (".safetensors", *TORCH_SUFFIXES) else None
    if suffix == ".safetensors" or kind == "safetensors":
        return SafetensorsCheckpoint(given, [path], folder=folder)
    if suffix in TORCH_SUFFIXES or kind == "torch":
        return TorchCheckpoint(given, [path], folder=folder)
    raise CheckpointError(
        f"{path}: is not a checkpoint (a {path.stat().st_size}-byte file whose name and content "
        f"match no weight format); {_EXPECTED}; pass the model's weight file or folder"
    )


def _sniff(path: Path) -> str | None:
    """Guess the format of a file with an unusual name from its first bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as exc:
        raise CheckpointError(
            f"{path}: cannot be read ({exc.strerror}); check the path and its permissions"
        ) from None
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return "torch"
    return None


def _open_index(index_path: Path, given: Path, folder: Path | None) -> Checkpoint:
    index = read_index(index_path)
    suffixes = {shard.suffix.lower() for shard in index.shards}
    if suffixes == {".safetensors"}:
        kind: type[SafetensorsCheckpoint] | type[TorchCheckpoint] = SafetensorsCheckpoint
    elif suffixes <= set(TORCH_SUFFIXES):
        kind = TorchCheckpoint
    else:
        raise CheckpointError(
            f"{index_path}: names shards of types {preview(sorted(suffixes))}; expected all "
            ".safetensors or all .bin shards; fix the index"
        )
    return kind(given, index.shards, folder=folder, weight_map=index.weight_map, index=index_path)


def _open_folder(folder: Path) -> Checkpoint:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    names = {p.name: p for p in files}
    for preferred in ("model.safetensors", "model.safetensors.index.json"):
        if preferred in names:
            return _open_file(names[preferred], folder, folder)
    indexes = [p for p in files if p.name.endswith(".safetensors.index.json")]
    safetensors = [p for p in files if p.suffix.lower() == ".safetensors"]
    chosen = _single(folder, indexes, "safetensors index") or _single(
        folder, safetensors, ".safetensors"
    )
    if chosen is not None:
        return _open_file(chosen, folder, folder)
    for preferred in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        if preferred in names:
            return _open_file(names[preferred], folder, folder)
    indexes = [p for p in files if p.name.endswith((".bin.index.json", ".pt.index.json"))]
    torch_files = [
        p for p in files if p.suffix.lower() in TORCH_SUFFIXES and p.name not in NOT_WEIGHTS
    ]
    chosen = _single(folder, indexes, "PyTorch index") or _single(
        folder, torch_files, "PyTorch weight"
    )
    if chosen is not None:
        return _open_file(chosen, folder, folder)
    found = ", ".join(p.name for p in files[:5]) or "nothing"
    more = f" and {len(files) - 5} more" if len(files) > 5 else ""
    nested = [
        p.name
        for p in sorted(folder.iterdir())
        if p.is_dir() and any((p / n).is_file() for n in ("model.safetensors", "config.json"))
    ]
    hint = f"; its subfolders {', '.join(nested[:3])} hold models" if nested else ""
    raise CheckpointError(
        f"{folder}: holds no weights (found {found}{more}{hint}); expected model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin or a .pt file; "
        "pass the folder or file that holds the weights"
    )


def _single(folder: Path, candidates: list[Path], what: str) -> Path | None:
    if len(candidates) > 1:
        listed = ", ".join(p.name for p in candidates[:5])
        raise CheckpointError(
            f"{folder}: holds {len(candidates)} {what} files ({listed}) and no index that "
            "ties them together; expected one checkpoint per folder; pass one file"
        )
    return candidates[0] if candidates else None
