"""The index file of a sharded checkpoint (``model.safetensors.index.json``).

Hugging Face splits large checkpoints into shards and writes an index:
``{"metadata": {"total_size": N}, "weight_map": {tensor name: shard file}}``.
The same layout serves ``pytorch_model.bin.index.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from modelfuse.checkpoint.names import check_name, json_reason, preview, tensor_label
from modelfuse.errors import CheckpointError

__all__ = [
    "MAX_INDEX_BYTES",
    "ShardIndex",
    "read_index",
]

#: An index names each tensor once in a few dozen bytes: 100 MB is millions of tensors.
MAX_INDEX_BYTES = 100_000_000


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
        The file is larger than :data:`MAX_INDEX_BYTES`, is not JSON (or nests
        it too deeply), has no ``weight_map`` of names to file names, names no
        tensor, names a tensor that is not valid Unicode, or names a shard
        that does not exist.

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
    expected = '{"weight_map": {tensor: shard file}}'
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # reported by the read below
    if size > MAX_INDEX_BYTES:
        raise CheckpointError(
            f"{path}: {size} bytes, more than the {MAX_INDEX_BYTES} a shard index can need; "
            f"expected a small JSON file {expected}; re-download or re-save the checkpoint"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(
            f"{path}: nests JSON lists or objects too deeply to be a shard index (expected "
            f"{expected}, three levels deep); re-download or re-save the checkpoint"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = json_reason(exc)
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
        check_name(name, str(path), "rename the tensor and re-save the checkpoint")
        relative = PurePosixPath(shard)
        if relative.is_absolute() or ".." in relative.parts or "\0" in shard:
            raise CheckpointError(
                f"{path}: tensor {tensor_label(name)} points to shard {preview(shard)} outside "
                "the index's folder; expected a file name beside the index; fix the index"
            )
        try:
            shard.encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(
                f"{path}: tensor {tensor_label(name)} points to shard {preview(shard)}, which is "
                "not valid Unicode; expected a file name beside the index; fix the index"
            ) from None
        resolved[name] = folder.joinpath(*relative.parts)
    shards = sorted(set(resolved.values()))
    for shard in shards:
        if not _is_file(shard):
            users = [n for n, s in resolved.items() if s == shard]
            others = f" and {len(users) - 1} others" if len(users) > 1 else ""
            raise CheckpointError(
                f"{path}: names shard {preview(shard.name)} (for tensor "
                f"{tensor_label(users[0])}{others}) but it does not exist in {folder}; "
                "expected every shard beside the index; download or copy the missing shard"
            )
    return ShardIndex(path, resolved, shards)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long or holding a NUL byte names no file
        return False
