"""The index file of a sharded checkpoint (``model.safetensors.index.json``).

Hugging Face splits large checkpoints into shards and writes an index:
``{"metadata": {"total_size": N}, "weight_map": {tensor name: shard file}}``.
The same layout serves ``pytorch_model.bin.index.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from modelfuse.errors import CheckpointError

__all__ = [
    "ShardIndex",
    "read_index",
]


@dataclass(frozen=True)
class ShardIndex:
    """A validated shard index.

    Attributes
    ----------
    path : Path
        The index file.
    weight_map : dict of str to Path
        Tensor name -> the shard file that holds it (beside the index).
    shards : list of Path
        The shard files, sorted by name (``-00001-of-`` before ``-00002-of-``).
    """

    path: Path
    weight_map: dict[str, Path]
    shards: list[Path]


def read_index(path: Path) -> ShardIndex:
    """Read a shard index and check that every shard it names exists.

    Parameters
    ----------
    path : Path
        The ``*.index.json`` file.

    Returns
    -------
    ShardIndex

    Raises
    ------
    CheckpointError
        The file is not JSON, has no ``weight_map`` of names to file names,
        names no tensor, or names a shard that does not exist.

    Examples
    --------
    >>> import json, tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> (folder / "a.safetensors").write_bytes(b"")
    0
    >>> _ = (folder / "m.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    >>> read_index(folder / "m.index.json").shards == [folder / "a.safetensors"]
    True
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:120]
        raise CheckpointError(
            f"{path}: cannot be read as a JSON shard index ({reason}); expected "
            '{"weight_map": {tensor: shard file}}; re-download or re-save the checkpoint'
        ) from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f'{path}: has no "weight_map" mapping tensor names to shard file names; '
            "expected a Hugging Face shard index; re-download or re-save the checkpoint"
        )
    if not weight_map:
        raise CheckpointError(
            f"{path}: its weight_map names no tensor; expected at least one; "
            "re-download or re-save the checkpoint"
        )
    folder = path.parent
    resolved: dict[str, Path] = {}
    for name, shard in weight_map.items():
        relative = PurePosixPath(shard)
        if relative.is_absolute() or ".." in relative.parts:
            raise CheckpointError(
                f"{path}: tensor {name!r} points to shard {shard!r} outside the index's folder; "
                "expected a file name beside the index; fix the index"
            )
        resolved[name] = folder.joinpath(*relative.parts)
    shards = sorted(set(resolved.values()))
    for shard in shards:
        if not shard.is_file():
            users = [n for n, s in resolved.items() if s == shard]
            others = f" and {len(users) - 1} others" if len(users) > 1 else ""
            raise CheckpointError(
                f"{path}: names shard {shard.name} (for tensor {users[0]!r}{others}) but "
                f"{shard} does not exist; expected every shard beside the index; "
                "download or copy the missing shard"
            )
    return ShardIndex(path, resolved, shards)
