"""The safetensors file format: header parsing and validation, tensor reads, header encoding.

A safetensors file is an 8-byte little-endian header length ``N``, ``N``
bytes of JSON mapping each tensor name to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the end of the header)
plus an optional ``"__metadata__"`` mapping of strings, then the tensor data,
contiguous and without gaps.

modelfuse parses the header itself and reads each tensor's bytes with
positioned reads into a freshly allocated tensor: whole files are never
memory-mapped, so memory stays bounded by the tensors in flight.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelfuse.checkpoint.base import Checkpoint, TensorInfo
from modelfuse.checkpoint.dtypes import SAFETENSORS_DTYPES, dtype_code, itemsize
from modelfuse.checkpoint.names import check_name, json_reason, preview, tensor_label
from modelfuse.errors import CheckpointError

__all__ = [
    "HeaderEntry",
    "SafetensorsCheckpoint",
    "SafetensorsHeader",
    "encode_header",
    "read_header",
]

_RESAVE = "the file is truncated or corrupt; re-save or re-download it"
#: The safetensors library refuses headers above this size; so does modelfuse.
MAX_HEADER_BYTES = 100_000_000
#: Largest dimension torch can hold (its sizes are signed 64-bit integers).
MAX_DIMENSION = 2**63 - 1
#: More dimensions than any model uses; a longer shape is refused as corrupt.
MAX_DIMENSIONS = 64


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors header; offsets are absolute positions in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one safetensors file.

    Attributes
    ----------
    entries : list of HeaderEntry
        The tensors, sorted by data offset (file order).
    metadata : dict of str to str
        The ``__metadata__`` mapping (empty when absent).
    data_start : int
        The file offset where tensor data begins (8 + header length).
    """

    entries: list[HeaderEntry]
    metadata: dict[str, str]
    data_start: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {tensor_label(key)} appears twice")
        result[key] = value
    return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: Path, name: str, raw: object, data_start: int, data_len: int) -> HeaderEntry:
    check_name(name, str(path), "rename the tensor and re-save the checkpoint")
    where = f"{path}: tensor {tensor_label(name)}"
    if not isinstance(raw, dict) or not {"dtype", "shape", "data_offsets"} <= raw.keys():
        raise CheckpointError(
            f"{where}: header entry {preview(raw)} lacks 'dtype', 'shape' or 'data_offsets'; "
            f"{_RESAVE}"
        )
    code, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        known = ", ".join(SAFETENSORS_DTYPES)
        raise CheckpointError(
            f"{where}: unknown dtype {preview(code)}, expected one of {known}; "
            "convert the checkpoint to one of those dtypes"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMENSIONS
        or not all(_is_int(d) and 0 <= d <= MAX_DIMENSION for d in shape)
    ):
        raise CheckpointError(
            f"{where}: shape {preview(shape)} is not a list of at most {MAX_DIMENSIONS} "
            f"integers from 0 to 2**63 - 1; {_RESAVE}"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(
            f"{where}: data_offsets {preview(offsets)} are not two increasing "
            f"non-negative integers; {_RESAVE}"
        )
    begin, end = offsets
    if end > data_len:
        raise CheckpointError(
            f"{where}: data_offsets {preview(offsets)} run past the end of the data, which "
            f"holds {data_len} bytes; {_RESAVE}"
        )
    dtype = SAFETENSORS_DTYPES[code]
    expected = _span(shape, itemsize(dtype), data_len)
    if end - begin != expected:
        needs = "more bytes than the file holds" if expected < 0 else f"{expected} bytes"
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes but shape "
            f"{preview(shape)} of {code} needs {needs}; {_RESAVE}"
        )
    return HeaderEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _span(shape: list[int], item: int, limit: int) -> int:
    """Bytes of a tensor of ``shape``, or -1 once the product passes ``limit`` (no huge numbers)."""
    if 0 in shape:
        return 0
    total = item
    for size in shape:
        total *= size
        if total > limit:
            return -1
    return total


def read_header(path: Path, file_size: int, read_at: Any) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file.

    Parameters
    ----------
    path : Path
        The file, for error messages.
    file_size : int
        Its size in bytes.
    read_at : callable
        ``read_at(offset, size) -> bytes`` reading from the file.

    Returns
    -------
    SafetensorsHeader

    Raises
    ------
    CheckpointError
        The header length runs past the end of the file, the header is not
        valid JSON, a dtype is unknown, offsets are out of range, overlap or
        leave gaps, or a byte span disagrees with its shape and dtype.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> save_file({"w": torch.zeros(2, 3)}, path)
    >>> with open(path, "rb") as f:
    ...     data = f.read()
    >>> header = read_header(Path(path), len(data), lambda o, n: data[o:o + n])
    >>> header.entries[0].shape
    (2, 3)
    """
    if file_size < 8:
        raise CheckpointError(
            f"{path}: {file_size} bytes, too short for a safetensors file (expected an 8-byte "
            f"header length, a JSON header and tensor data); {_RESAVE}"
        )
    (header_len,) = struct.unpack("<Q", read_at(0, 8))
    if header_len > file_size - 8:
        raise CheckpointError(
            f"{path}: the header length field says {header_len} bytes but only "
            f"{file_size - 8} bytes follow it; the file is truncated or not a safetensors file; "
            "re-save or re-download it"
        )
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: the header length field says {header_len} bytes, more than the "
            f"{MAX_HEADER_BYTES} safetensors allows; the file is corrupt or not safetensors"
        )
    raw = read_at(8, header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise CheckpointError(
            f"{path}: the safetensors header nests JSON lists or objects too deeply to be a "
            "header (a safetensors header is two levels deep); the file is corrupt or crafted; "
            "re-save or re-download it"
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        reason = json_reason(exc)
        raise CheckpointError(
            f"{path}: the safetensors header is not valid JSON ({reason}); the file is corrupt "
            "or not a safetensors file; re-save or re-download it"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the safetensors header is a JSON {type(header).__name__}, expected an "
            f"object mapping tensor names to dtype, shape and data_offsets; {_RESAVE}"
        )
    metadata = header.pop("__metadata__", {})
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(
            f"{path}: __metadata__ {preview(metadata)} is not a mapping of strings to "
            f"strings; {_RESAVE}"
        )
    data_start = 8 + header_len
    data_len = file_size - data_start
    entries = [_parse_entry(path, n, v, data_start, data_len) for n, v in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    cursor, previous = data_start, None
    for entry in entries:
        if entry.begin < cursor:
            raise CheckpointError(
                f"{path}: tensor {tensor_label(entry.name)} overlaps tensor "
                f"{tensor_label(previous or '')} (its data begins at byte "
                f"{entry.begin - data_start}, before that one ends at {cursor - data_start}); "
                f"{_RESAVE}"
            )
        if entry.begin > cursor:
            after = (
                f"after tensor {tensor_label(previous)}" if previous else "at the start of the data"
            )
            raise CheckpointError(
                f"{path}: a gap of {entry.begin - cursor} bytes {after}, before tensor "
                f"{tensor_label(entry.name)}; expected contiguous tensor data; {_RESAVE}"
            )
        cursor, previous = entry.end, entry.name
    if cursor != file_size:
        raise CheckpointError(
            f"{path}: {file_size - cursor} bytes at the end of the file belong to no tensor; "
            f"expected the data to end with the last tensor; {_RESAVE}"
        )
    return SafetensorsHeader(entries, metadata, data_start)


def encode_header(
    tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...], int, int]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Encode a safetensors header: the 8-byte length followed by the padded JSON.

    Parameters
    ----------
    tensors : sequence of (name, dtype, shape, begin, end)
        Every tensor with its data offsets relative to the end of the header.
    metadata : mapping of str to str, optional
        Written as ``__metadata__``.

    Returns
    -------
    bytes
        The bytes that precede the tensor data; their length is a multiple of 8
        (the JSON is padded with spaces) so the data starts aligned.

    Examples
    --------
    >>> import torch
    >>> blob = encode_header([("w", torch.float32, (2,), 0, 8)], {"format": "pt"})
    >>> len(blob) % 8, blob[8:9]
    (0, b'{')
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, dtype, shape, begin, end in tensors:
        code = dtype_code(dtype)
        if code is None:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class _PositionalFile:
    """A file opened for positioned reads that several threads may share."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()
        self.size = os.fstat(self._file.fileno()).st_size

    def read_into(self, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` from ``offset``; return the number of bytes read (short at EOF)."""
        done, total = 0, len(buffer)
        if hasattr(os, "preadv"):
            fd = self._file.fileno()
            while done < total:
                count = os.preadv(fd, [buffer[done:]], offset + done)
                if count == 0:
                    break
                done += count
            return done
        with self._lock:
            self._file.seek(offset)
            while done < total:
                count = self._file.readinto(buffer[done:])
                if not count:
                    break
                done += count
        return done

    def read_bytes(self, offset: int, size: int) -> bytes:
        buffer = bytearray(size)
        count = self.read_into(memoryview(buffer), offset)
        return bytes(buffer[:count])

    def close(self) -> None:
        self._file.close()


class SafetensorsCheckpoint(Checkpoint):
    """A checkpoint of one or several safetensors files (shards), read lazily.

    Opening reads and validates every header; :meth:`read` reads one tensor's
    bytes with a positioned read into a fresh tensor. Use
    :func:`modelfuse.checkpoint.open_checkpoint` rather than this class.

    Parameters
    ----------
    path : Path
        What the user gave (file, index file or folder), for messages.
    files : sequence of Path
        The safetensors files, in order.
    folder : Path, optional
        The model folder the weights belong to.
    weight_map : mapping of str to Path, optional
        For a sharded checkpoint, the index's tensor -> shard map; every
        tensor it names must be in that shard.
    index : Path, optional
        The index file, for messages.

    Attributes
    ----------
    metadata : dict of str to str
        The ``__metadata__`` of the first file.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> save_file({"a": torch.arange(3.0), "b": torch.ones(2)}, str(path))
    >>> ckpt = SafetensorsCheckpoint(path, [path])
    >>> ckpt.read("a").tolist()
    [0.0, 1.0, 2.0]
    >>> ckpt.close()
    """

    def __init__(
        self,
        path: Path,
        files: Sequence[Path],
        *,
        folder: Path | None = None,
        weight_map: Mapping[str, Path] | None = None,
        index: Path | None = None,
    ) -> None:
        super().__init__(path, folder)
        self.metadata: dict[str, str] = {}
        self._files: list[_PositionalFile] = []
        self._where: dict[str, tuple[_PositionalFile, int]] = {}
        self._closed = False
        try:
            self._open(files, weight_map, index)
        except BaseException:
            self.close()
            raise

    def _open(
        self,
        files: Sequence[Path],
        weight_map: Mapping[str, Path] | None,
        index: Path | None,
    ) -> None:
        for number, file_path in enumerate(files):
            try:
                handle = _PositionalFile(file_path)
            except OSError as exc:
                raise CheckpointError(
                    f"{file_path}: cannot be opened ({exc.strerror}); expected a readable "
                    "safetensors file; check the path and its permissions"
                ) from None
            self._files.append(handle)
            header = read_header(file_path, handle.size, handle.read_bytes)
            if number == 0:
                self.metadata = header.metadata
            for entry in header.entries:
                if entry.name in self._infos:
                    raise CheckpointError(
                        f"{file_path}: tensor {tensor_label(entry.name)} is also in "
                        f"{self._infos[entry.name].file}; expected each tensor in one shard; "
                        "remove the duplicate shard"
                    )
                self._infos[entry.name] = TensorInfo(
                    entry.name, entry.shape, entry.dtype, entry.end - entry.begin, file_path
                )
                self._where[entry.name] = (handle, entry.begin)
        if weight_map is not None:
            for name, shard in weight_map.items():
                info = self._infos.get(name)
                if info is None or info.file != shard:
                    raise CheckpointError(
                        f"{index}: names tensor {tensor_label(name)} in shard {shard.name}, but "
                        f"{shard} does not hold it; the shard or the index is wrong; "
                        "re-download or re-save the checkpoint"
                    )

    def read(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` as a fresh tensor; only its own bytes are read.

        Examples
        --------
        >>> import os, tempfile, torch
        >>> from safetensors.torch import save_file
        >>> from modelfuse.checkpoint import open_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> save_file({"w": torch.eye(2, dtype=torch.bfloat16)}, path)
        >>> with open_checkpoint(path) as ckpt:
        ...     ckpt.read("w").dtype
        torch.bfloat16
        """
        info = self.info(name)
        return self._read_span(info, 0, info.shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Return rows ``start:stop`` of tensor ``name``, reading only their bytes."""
        info = self._check_rows(name, start, stop)
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        return self._read_span(info, start * row_bytes, (stop - start, *info.shape[1:]))

    def _read_span(self, info: TensorInfo, skip: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Read the part of tensor ``info`` that starts ``skip`` bytes in and has ``shape``."""
        if self._closed:
            raise CheckpointError(
                f"{self.path}: read {tensor_label(info.name)} after close(); open it again"
            )
        handle, offset = self._where[info.name]
        nbytes = math.prod(shape) * itemsize(info.dtype)
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        raw = torch.empty(nbytes, dtype=torch.uint8)
        count = handle.read_into(memoryview(raw.numpy()), offset + skip)
        if count != nbytes:
            raise CheckpointError(
                f"{info.file}: tensor {tensor_label(info.name)}: read {count} of its {nbytes} bytes; the "
                "file shrank after it was opened; re-save or re-download it"
            )
        return self._checked(info, raw.view(info.dtype).reshape(shape))

    def close(self) -> None:
        """Close the files; idempotent."""
        self._closed = True
        for handle in self._files:
            handle.close()
