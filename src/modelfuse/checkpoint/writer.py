"""A streaming, atomic safetensors writer.

:class:`CheckpointWriter` is told every output tensor's name, shape and dtype
up front, so it lays out the shards before any tensor exists: it writes each
shard's header at once and then writes each tensor's bytes at its
precomputed offset as soon as it arrives, in any order, from any thread.
Everything goes into a temporary folder beside the target, which is moved
into place only when every tensor has been written exactly once; an error or
an interruption removes the temporary folder and leaves the target untouched.
"""

from __future__ import annotations

import collections
import errno
import fnmatch
import json
import math
import os
import re
import secrets
import shutil
import socket
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Literal

import torch

from modelfuse.checkpoint.dtypes import SAFETENSORS_DTYPES, dtype_code, itemsize
from modelfuse.checkpoint.names import preview, tensor_label
from modelfuse.checkpoint.safetensors_format import encode_header
from modelfuse.checkpoint.sizes import parse_size
from modelfuse.errors import CheckpointError, OutputError

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "INDEX_NAME",
    "MARKER_NAME",
    "TOKENIZER_FILE_PATTERNS",
    "CheckpointWriter",
    "is_model_file",
    "is_tokenizer_file",
    "remove_stale_folders",
    "shard_names",
]

#: Hugging Face's default shard budget: 5GB (decimal).
DEFAULT_SHARD_SIZE = 5_000_000_000
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: The file in every temporary folder of a writer that says which process writes it.
MARKER_NAME = ".modelfuse-partial"
_MARKER = re.compile(r"^modelfuse-partial pid=(\d{1,10}) host=(\S{1,255})\n\Z")

#: Non-weight files of a Hugging Face model folder that belong with merged weights.
MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "merges.txt",
    "tokenizer*",
    "vocab*",
    "*.model",
    "*.tiktoken",
    "chat_template*",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_MAX_DIMENSION = 2**63 - 1

_State = Literal["open", "committing", "committed", "aborted"]


TOKENIZER_FILE_PATTERNS = (
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "tokenizer*",
    "vocab*",
    "*.model",
    "*.tiktoken",
    "chat_template*",
)
"""The files of a model folder that make up its tokenizer (and chat template)."""


def is_tokenizer_file(name: str) -> bool:
    """Whether a file of a model folder belongs to its tokenizer.

    Examples
    --------
    >>> [is_tokenizer_file(n) for n in ["tokenizer.json", "merges.txt", "config.json"]]
    [True, True, False]
    """
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TOKENIZER_FILE_PATTERNS)


def is_model_file(name: str) -> bool:
    """Whether a file of a model folder is a non-weight file to copy beside merged weights.

    Examples
    --------
    >>> [is_model_file(n) for n in ["config.json", "tokenizer.json", "model.safetensors"]]
    [True, True, False]
    """
    if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
        return False
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILE_PATTERNS)


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards, as Hugging Face names them.

    Examples
    --------
    >>> shard_names(1)
    ['model.safetensors']
    >>> shard_names(2)
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


@dataclass(frozen=True)
class _Slot:
    """Where one planned tensor goes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    shard: int
    offset: int

    @property
    def rows(self) -> int:
        """Rows along the first dimension; a scalar counts as one row."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (the one low-level write of this module)."""
    done, total = 0, len(data)
    while done < total:
        done += os.pwrite(fd, data[done:], offset + done)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` in C order, without modifying it (copies only when needed)."""
    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.resolve_conj().resolve_neg().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open folders; their renames are durable anyway
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _make_sibling(target: Path, tag: str) -> Path:
    """Create an empty folder ``.NAME.TAG-<8 hex digits>`` beside ``target`` (umask's mode)."""
    while True:
        folder = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder


def _host() -> str:
    """This machine's name as the marker holds it: ASCII, no spaces, never empty."""
    name = socket.gethostname().encode("ascii", "backslashreplace").decode("ascii")
    return "".join("_" if c.isspace() else c for c in name)[:255] or "unknown"


def _marker_text() -> str:
    return f"modelfuse-partial pid={os.getpid()} host={_host()}\n"


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process (or an impossible pid, which runs nowhere)
    return True


def _stale_owner(folder: Path) -> int | None:
    """The pid of the interrupted writer that left ``folder``, or None if it is not recognised.

    A folder is recognised only if it is a real folder holding a marker file
    written by a writer on this host whose process no longer runs.
    """
    marker = folder / MARKER_NAME
    try:
        if folder.is_symlink() or not folder.is_dir() or marker.is_symlink():
            return None
        if not marker.is_file() or marker.stat().st_size > 300:
            return None
        found = _MARKER.match(marker.read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError):
        return None
    if found is None or found.group(2) != _host():
        return None
    pid = int(found.group(1))
    return None if pid == os.getpid() or _is_running(pid) else pid


def remove_stale_folders(target: Path) -> list[str]:
    """Remove temporary folders that interrupted writers (killed processes) left beside ``target``.

    Only folders named as this module names them (``.NAME.tmp-<8 hex
    digits>``) and holding its marker file from a process of this host that
    no longer runs are removed; anything else is never touched.

    Returns
    -------
    list of str
        One note per folder removed.
    """
    pattern = re.compile(r"\." + re.escape(target.name) + r"\.tmp-[0-9a-f]{8}")
    notes = []
    try:
        candidates = sorted(target.parent.iterdir())
    except OSError:
        return []
    for folder in candidates:
        if not pattern.fullmatch(folder.name):
            continue
        pid = _stale_owner(folder)
        if pid is None:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.lexists(folder):
            notes.append(
                f"removed {folder}, the temporary folder of an interrupted modelfuse run "
                f"(process {pid}, no longer running)"
            )
    return notes


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _cleanup(folder: Path, fds: list[int]) -> None:
    """Close the shard files and remove the temporary folder."""
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass
    shutil.rmtree(folder, ignore_errors=True)


class CheckpointWriter:
    """Write a safetensors checkpoint tensor by tensor, atomically.

    Parameters
    ----------
    out : str or path-like
        The output folder. It must not exist unless ``overwrite`` is true;
        missing parent folders are created.
    tensors : sequence of (name, shape, dtype)
        Every tensor the checkpoint will hold, in order. Shards are filled in
        this order; within a shard, tensors with wider elements come first so
        that every tensor's data is aligned to its element size.
    shard_size : int or str, default 5_000_000_000
        Byte budget of one shard (``"5GB"`` strings are accepted too). A new
        shard starts when the next tensor would exceed it; a tensor larger
        than the budget gets a shard of its own.
    overwrite : bool, default False
        Replace an existing ``out``, only once the new checkpoint is complete.
    metadata : dict of str to str, optional
        Stored in every shard's ``__metadata__``, beside ``"format": "pt"``
        (which transformers requires, so it always wins).
    file_name : str, optional
        Write every tensor into one file of this name (a ``.safetensors``
        name without folders, e.g. PEFT's ``adapter_model.safetensors``)
        instead of ``model.safetensors`` or shards; ``shard_size`` is then
        not used.

    Attributes
    ----------
    out : Path
        The target folder.
    bytes_written : int
        Tensor bytes written so far (for progress bars).
    notes : list of str
        What the writer did beside writing, for the user: temporary folders
        of interrupted runs it removed.

    Raises
    ------
    OutputError
        ``out`` exists and ``overwrite`` is false; a dtype cannot be stored
        in safetensors; the disk fills up or a write fails (the temporary
        folder is removed and ``out`` is untouched).

    Notes
    -----
    One shard is written as ``model.safetensors``; several as
    ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``
    in Hugging Face's format. Files are written into
    ``OUT.parent/.OUT.name.tmp-<random>`` and renamed into place by
    :meth:`commit`. Leaving a ``with`` block without :meth:`commit` (normally
    or by an exception, ``KeyboardInterrupt`` included) calls :meth:`abort`.

    A temporary folder holds a marker file (:data:`MARKER_NAME`) naming the
    writing process and host. A process killed outright (SIGKILL, power
    loss) cannot remove its folder; the next writer to the same ``out``
    removes every such folder whose process no longer runs on this host, and
    says so in :attr:`notes`. Folders without a valid marker are never touched.

    Examples
    --------
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from modelfuse.checkpoint import open_checkpoint
    >>> out = Path(tempfile.mkdtemp()) / "merged"
    >>> plan = [("a", (2,), torch.float32), ("b", (3,), torch.bfloat16)]
    >>> with CheckpointWriter(out, plan) as writer:
    ...     writer.write("b", torch.ones(3, dtype=torch.bfloat16))
    ...     writer.write("a", torch.zeros(2))
    ...     _ = writer.commit()
    >>> sorted(p.name for p in out.iterdir())
    ['model.safetensors']
    >>> with open_checkpoint(out) as ckpt:
    ...     ckpt.read("b").tolist()
    [1.0, 1.0, 1.0]
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        shard_size: int | str = DEFAULT_SHARD_SIZE,
        overwrite: bool = False,
        metadata: Mapping[str, str] | None = None,
        file_name: str | None = None,
    ) -> None:
        self.out = Path(out)
        if file_name is not None and (
            not file_name.endswith(".safetensors")
            or PurePosixPath(file_name).name != file_name
            or file_name.startswith(".")
        ):
            raise ValueError(
                f"file_name {preview(file_name)} must be a plain .safetensors file name"
            )
        self.overwrite = overwrite
        self._target = self.out.absolute()
        budget = parse_size(shard_size)
        if metadata is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise TypeError(f"metadata must map strings to strings; got {dict(metadata)!r:.200}")
        self._metadata = {**(metadata or {}), "format": "pt"}
        for key, value in self._metadata.items():
            if not (_is_unicode(key) and _is_unicode(value)):
                raise OutputError(
                    f"{self.out}: metadata {preview(key)}: {preview(value)} is not valid "
                    "Unicode (it holds a lone surrogate), so safetensors cannot store it as "
                    "UTF-8; expected text; remove or fix that metadata entry"
                )
        if os.path.lexists(self._target) and not overwrite:
            raise OutputError(
                f"{self.out}: already exists; expected a new output path; pass --overwrite "
                "(overwrite=True) to replace it, or choose another path"
            )
        shards = self._plan(tensors, None if file_name is not None else budget)
        self._names = [file_name] if file_name is not None else shard_names(len(shards))
        self._lock = threading.Condition()
        self._state: _State = "open"
        # writes in flight, per thread: an interrupt can leave the main thread's count
        # behind, and a thread never waits for its own (see _others_writing)
        self._active: collections.Counter[int] = collections.Counter()
        self._rows: dict[str, list[tuple[int, int]]] = {}  # row blocks written, per tensor
        self._bytes_written = 0
        self._extra: set[str] = set()
        self._fds: list[int] = []
        self._failure: OutputError | None = None
        self.notes: list[str] = []
        try:
            self._target.parent.mkdir(parents=True, exist_ok=True)
            self.notes = remove_stale_folders(self._target)
            self._tmp = _make_sibling(self._target, "tmp")
        except OSError as exc:
            raise OutputError(
                f"{self.out}: cannot create a temporary folder in {self._target.parent} "
                f"({exc.strerror}); expected a writable folder; check the path and permissions"
            ) from None
        self._finalizer = weakref.finalize(self, _cleanup, self._tmp, self._fds)
        try:
            (self._tmp / MARKER_NAME).write_text(_marker_text(), encoding="ascii")
            self._create_shards(shards)
        except OSError as exc:
            raise self._failed(self._write_error(exc, "the shard headers")) from exc
        except BaseException:  # an interrupt while the headers are written
            self.abort()
            raise

    def _plan(
        self, tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]], budget: int | None
    ) -> list[list[tuple[str, tuple[int, ...], torch.dtype, int]]]:
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        seen: set[str] = set()
        size = 0
        for name, shape, dtype in tensors:
            if not isinstance(name, str) or name in seen or name == "__metadata__":
                raise ValueError(
                    f"tensor name {preview(name)} is not a string, is reserved or is repeated"
                )
            seen.add(name)
            if not _is_unicode(name):
                raise OutputError(
                    f"{self.out}: tensor name {tensor_label(name)} is not valid Unicode (it "
                    "holds a lone surrogate), so safetensors cannot store it as UTF-8; "
                    "expected text; rename the tensor"
                )
            shape = tuple(int(d) for d in shape)
            if any(not 0 <= d <= _MAX_DIMENSION for d in shape):
                raise ValueError(
                    f"tensor {tensor_label(name)}: shape {preview(shape)} has a dimension "
                    "outside 0 to 2**63 - 1"
                )
            if dtype_code(dtype) is None:
                known = ", ".join(
                    str(d).removeprefix("torch.") for d in SAFETENSORS_DTYPES.values()
                )
                raise OutputError(
                    f"{self.out}: tensor {tensor_label(name)} has dtype {dtype}, which safetensors cannot "
                    f"store; expected one of {known}; choose another output dtype"
                )
            nbytes = math.prod(shape) * itemsize(dtype)
            if budget is not None and shards[-1] and size + nbytes > budget:
                shards.append([])
                size = 0
            shards[-1].append((name, shape, dtype, nbytes))
            size += nbytes
        return shards

    def _create_shards(
        self, shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]]
    ) -> None:
        self._slots: dict[str, _Slot] = {}
        for number, (file_name, members) in enumerate(zip(self._names, shards)):
            ordered = sorted(members, key=lambda m: -itemsize(m[2]))
            entries, cursor = [], 0
            for name, shape, dtype, nbytes in ordered:
                entries.append((name, dtype, shape, cursor, cursor + nbytes))
                cursor += nbytes
            header = encode_header(entries, self._metadata)
            for name, dtype, shape, begin, end in entries:
                self._slots[name] = _Slot(
                    name, shape, dtype, end - begin, number, len(header) + begin
                )
            fd = os.open(self._tmp / file_name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            self._fds.append(fd)
            _write_at(fd, memoryview(header), 0)
            os.ftruncate(fd, len(header) + cursor)

    @property
    def bytes_written(self) -> int:
        """Tensor bytes written so far."""
        return self._bytes_written

    @property
    def files(self) -> list[str]:
        """The weight files the checkpoint will hold (shards, then the index if sharded)."""
        return self._names + ([INDEX_NAME] if len(self._names) > 1 else [])

    def _write_error(self, exc: OSError, what: str) -> OutputError:
        """The error for a failed write; the first one is kept for every later call."""
        # short enough that the command line never cuts the fix off a long path
        if exc.errno in _DISK_FULL:
            error = OutputError(
                f"{self.out}: the disk filled up while writing {what}; nothing was written to "
                "it; free space and run again"
            )
        else:
            error = OutputError(
                f"{self.out}: could not write {what} ({exc.strerror or exc}); nothing was "
                "written to it; check the folder's permissions and free space, then run again"
            )
        with self._lock:
            if self._failure is None:
                self._failure = error
        return error

    def _failed(self, error: OutputError) -> OutputError:
        """Abort after ``error`` and return it, saying so if the temporary folder stayed."""
        self.abort()
        if os.path.lexists(self._tmp):
            return OutputError(
                f"{error}; the temporary folder {self._tmp} could not be removed: remove it "
                "(or the next run to this output will, once this process has ended)"
            )
        return error

    def _check_open(self, action: str) -> None:
        if self._state != "open" and self._failure is not None:
            # another thread's write failed: its reason (a full disk) is the one to report
            raise OutputError(str(self._failure))
        if self._state != "open":
            raise OutputError(
                f"{self.out}: {action} after the writer was {self._state}; expected an open "
                "writer; create a new CheckpointWriter"
            )

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write tensor ``name`` at its place; thread-safe, in any order, once per name.

        The tensor is only read, never modified; it may live on any device.

        Raises
        ------
        ValueError
            ``name`` is not in the plan, was already written, or ``tensor``'s
            shape or dtype differs from the plan.
        OutputError
            The write failed (e.g. the disk filled up): the writer aborts.
        """
        slot = self._planned(name, tensor)
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise ValueError(
                f"{self.out}: tensor {tensor_label(name)} was planned as {slot.dtype} {list(slot.shape)} "
                f"but written as {tensor.dtype} {list(tensor.shape)}"
            )
        self._put(slot, 0, slot.rows, tensor, whole=True)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows ``start:start + len(rows)`` of tensor ``name``; thread-safe.

        Lets a caller produce a large tensor in blocks of rows (along the
        first dimension), so memory is bounded by the block. Blocks may come
        in any order from any thread; :meth:`commit` checks that they cover
        every row exactly once.

        Raises
        ------
        ValueError
            ``name`` is not planned or is a scalar, ``rows`` has the wrong
            dtype or trailing shape, is empty, falls outside the tensor, or
            overlaps rows already written.
        OutputError
            The write failed (e.g. the disk filled up): the writer aborts.

        Examples
        --------
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> out = Path(tempfile.mkdtemp()) / "out"
        >>> with CheckpointWriter(out, [("w", (4, 2), torch.float32)]) as writer:
        ...     writer.write_rows("w", 2, torch.ones(2, 2))
        ...     writer.write_rows("w", 0, torch.zeros(2, 2))
        ...     _ = writer.commit()
        >>> from modelfuse.checkpoint import open_checkpoint
        >>> with open_checkpoint(out) as ckpt:
        ...     ckpt.read("w")[:, 0].tolist()
        [0.0, 0.0, 1.0, 1.0]
        """
        slot = self._planned(name, rows)
        count = rows.shape[0] if rows.dim() else 0
        if (
            not slot.shape
            or rows.dim() != len(slot.shape)
            or tuple(rows.shape[1:]) != slot.shape[1:]
            or rows.dtype != slot.dtype
            or count < 1
            or not 0 <= start <= slot.rows - count
        ):
            raise ValueError(
                f"{self.out}: tensor {tensor_label(name)} was planned as {slot.dtype} {list(slot.shape)}; "
                f"got rows {start}:{start + count} of {rows.dtype} {list(rows.shape)}; expected "
                f"a non-empty block of whole rows inside the tensor"
            )
        self._put(slot, start, start + count, rows, whole=False)

    def _planned(self, name: str, tensor: torch.Tensor) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(
                f"{self.out}: tensor {tensor_label(name)} is not among the planned tensors"
            )
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"tensor {tensor_label(name)}: expected a torch.Tensor, got {type(tensor).__name__}"
            )
        return slot

    def _put(self, slot: _Slot, start: int, stop: int, tensor: torch.Tensor, whole: bool) -> None:
        """Write ``tensor`` as rows ``start:stop`` of ``slot``, recording the block."""
        block = (start, stop)
        with self._lock:
            self._check_open(f"write({tensor_label(slot.name)})")
            blocks = self._rows.setdefault(slot.name, [])
            if (whole and blocks) or any(a < stop and start < b for a, b in blocks):
                what = "" if whole else f" rows {start}:{stop} of"
                raise ValueError(
                    f"{self.out}:{what} tensor {tensor_label(slot.name)} was already written"
                )
            blocks.append(block)
            self._active[threading.get_ident()] += 1
        failure: OSError | None = None
        done = False
        try:
            data = _tensor_bytes(tensor)
            _write_at(self._fds[slot.shard], data, slot.offset + start * slot.row_bytes)
            done = True
        except OSError as exc:
            failure = exc
        finally:
            with self._lock:
                self._active[threading.get_ident()] -= 1
                if done:
                    self._bytes_written += len(data)
                else:
                    blocks.remove(block)
                self._lock.notify_all()
        if failure is not None:
            error = self._write_error(failure, f"tensor {tensor_label(slot.name)}")
            raise self._failed(error) from failure

    def add_file(self, relative_name: str, source: Path | bytes | str) -> None:
        """Add a non-weight file to the checkpoint (``modelfuse.yaml``, ``config.json``, ...).

        Parameters
        ----------
        relative_name : str
            Its path inside the output folder, e.g. ``"config.json"``.
        source : Path, bytes or str
            A file to copy (:class:`~pathlib.Path`), raw bytes, or text
            (``str``, written as UTF-8; a ``str`` is content, never a path).
            Adding a name twice replaces the earlier content.
        """
        relative = PurePosixPath(relative_name)
        if (
            not relative_name
            or relative.is_absolute()
            or ".." in relative.parts
            or (
                len(relative.parts) == 1
                and relative_name.endswith((*_WEIGHT_SUFFIXES, ".index.json"))
            )
            or relative.parts[0] == MARKER_NAME
        ):
            raise ValueError(
                f"{self.out}: extra file name {relative_name!r} must be a relative path inside "
                "the output that does not look like a weight file or shard index beside the "
                "checkpoint's own (those would be mistaken for its weights; a subfolder may "
                "hold some)"
            )
        with self._lock:
            self._check_open(f"add_file({relative_name!r})")
        target = self._tmp.joinpath(*relative.parts)
        if isinstance(source, os.PathLike) and not Path(source).is_file():
            raise CheckpointError(
                f"{source}: no such file to copy into {self.out} as {relative_name}; "
                "check the model folder"
            )
        if isinstance(source, str):
            try:
                source = source.encode("utf-8")
            except UnicodeEncodeError as exc:
                near = source[max(0, exc.start - 15) : exc.end + 15]
                raise self._failed(
                    OutputError(
                        f"{self.out}: {relative_name} would hold text that is not valid Unicode "
                        f"(near {preview(near)}), most often a file or folder name whose bytes "
                        "are not UTF-8; expected text; rename that file or folder and run again"
                    )
                ) from None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, os.PathLike):
                shutil.copyfile(source, target)
            else:
                target.write_bytes(source)
        except OSError as exc:
            raise self._failed(self._write_error(exc, relative_name)) from exc
        self._extra.add(relative_name)

    def copy_model_files(self, folder: Path, *, tokenizer: bool = True) -> list[str]:
        """Copy the non-weight files of a Hugging Face model folder into the checkpoint.

        Copies ``config.json``, ``generation_config.json``, tokenizer files
        (``tokenizer*``, ``special_tokens_map.json``, ``added_tokens.json``,
        ``vocab*``, ``merges.txt``, ``*.model``, ``*.tiktoken``),
        ``chat_template*`` and processor configs; never weights. Files
        already given with :meth:`add_file` are kept. ``tokenizer=False``
        leaves the tokenizer's files out (:func:`is_tokenizer_file`).

        Returns
        -------
        list of str
            The names copied.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(
                f"{folder}: no such folder; expected the model folder holding config.json and "
                "tokenizer files; check the path"
            )
        copied = []
        for path in sorted(folder.iterdir()):
            if not tokenizer and is_tokenizer_file(path.name):
                continue
            if path.is_file() and is_model_file(path.name) and path.name not in self._extra:
                self.add_file(path.name, path)
                copied.append(path.name)
        return copied

    def commit(self) -> Path:
        """Check every tensor was written once, flush to disk, and move the folder into place.

        Returns
        -------
        Path
            ``out``.

        Raises
        ------
        OutputError
            Some planned tensors were never written, ``out`` appeared meanwhile
            (without ``overwrite``), or flushing or renaming failed. The
            writer is aborted: nothing is left behind and ``out`` is untouched.
        """
        with self._lock:
            if self._state == "committed":
                return self.out
            self._check_open("commit()")
            self._state = "committing"
            while self._others_writing():
                self._lock.wait()
        missing = [
            name
            for name, slot in self._slots.items()
            if not self._rows.get(name) or sum(b - a for a, b in self._rows[name]) != slot.rows
        ]
        if missing:
            self.abort()
            shown = ", ".join(repr(n) for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise OutputError(
                f"{self.out}: {len(missing)} of {len(self._slots)} planned tensors were never "
                f"written in full ({shown}{more}); expected every tensor written once; "
                f"nothing was written to {self.out}"
            )
        try:
            while self._fds:
                fd = self._fds.pop(0)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if len(self._names) > 1:
                self._write_index()
            for name in self._extra:
                _fsync_path(self._tmp / name)
            os.unlink(self._tmp / MARKER_NAME)  # the folder is the output from here on
            _fsync_path(self._tmp, directory=True)
            self._move_into_place()
        except OutputError as exc:
            raise self._failed(exc) from None
        except OSError as exc:
            raise self._failed(self._write_error(exc, "the checkpoint")) from exc
        with self._lock:
            self._state = "committed"
        self._finalizer.detach()
        return self.out

    def _write_index(self) -> None:
        weight_map = {name: self._names[slot.shard] for name, slot in self._slots.items()}
        total = sum(slot.nbytes for slot in self._slots.values())
        document = {"metadata": {"total_size": total}, "weight_map": weight_map}
        data = (json.dumps(document, indent=2) + "\n").encode("utf-8")
        fd = os.open(self._tmp / INDEX_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _write_at(fd, memoryview(data), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _move_into_place(self) -> None:
        """Rename the finished folder to ``out``; an existing ``out`` is kept until then.

        With ``overwrite``, the old ``out`` is first renamed into a
        ``.OUT.old-*`` folder beside it and removed only once the new one is in
        place. If a rename fails, the old ``out`` is moved back and the empty
        backup folder removed; if even moving it back fails, the error says
        where the previous output is. It is never deleted before the new one
        is in place.
        """
        target = self._target
        if not os.path.lexists(target):
            os.rename(self._tmp, target)
        elif not self.overwrite:
            raise OutputError(
                f"{self.out}: appeared while the checkpoint was being written; expected a new "
                "output path; pass --overwrite (overwrite=True) to replace it, "
                "or choose another path"
            )
        else:
            backup = _make_sibling(target, "old")
            old = backup / "previous"
            try:
                os.rename(target, old)
            except OSError:
                _remove_empty(backup)
                raise
            try:
                os.rename(self._tmp, target)
            except OSError as exc:
                try:
                    os.rename(old, target)
                except OSError:
                    raise OutputError(
                        f"{self.out}: could not move the new checkpoint into place "
                        f"({exc.strerror or exc}) nor the previous one back; the previous "
                        f"{self.out} is kept whole in {old}; move it back with "
                        f"`mv {old} {self.out}`, check the folder's permissions, then run again"
                    ) from exc
                _remove_empty(backup)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        _fsync_path(target.parent, directory=True)

    def _others_writing(self) -> bool:
        """Whether a thread other than this one is writing (call with the lock held)."""
        me = threading.get_ident()
        return any(count > 0 for ident, count in self._active.items() if ident != me)

    def abort(self) -> None:
        """Stop writing and remove the temporary folder; ``out`` is untouched. Idempotent."""
        with self._lock:
            if self._state == "committed":
                return
            self._state = "aborted"
            while self._others_writing():
                self._lock.wait()
        self._finalizer()  # once only; a second abort (say, after an interrupted one) retries

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != "committed":
            self.abort()
