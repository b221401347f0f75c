"""PyTorch files pickled with protocol 4 or 5, read through torch's safe loader.

``torch.load(weights_only=True)``, the only way modelfuse unpickles, reads
the opcodes of pickle protocol 2 (``torch.save``'s default) and refuses the
newer ones (``FRAME``, ``MEMOIZE``, ``STACK_GLOBAL``, short strings) that
``torch.save(..., pickle_protocol=4)`` writes, even when the file holds
nothing but tensors. This module rewrites such a pickle into protocol 2
without running it (:func:`downgrade_pickle` only parses opcodes, with
:mod:`pickletools`) and hands the rewritten file to the same safe loader, so
what the file may hold is exactly what a protocol-2 file may hold.

The rewritten file is presented to torch as a stream whose tensor data are
read from the original file, so nothing is copied to disk; torch then reads
the tensors into memory (a stream cannot be memory-mapped).
"""

from __future__ import annotations

import io
import pickletools
import struct
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "downgrade_pickle",
    "load_any_protocol",
    "pickle_protocol",
]

#: Pickles in torch's legacy (non-zip) format: magic number, protocol, system info,
#: the object, and the storage keys; the tensor data follow them.
_LEGACY_PICKLES = 5
_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})
_PUTS = frozenset({"MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"})
_GETS = frozenset({"BINGET", "LONG_BINGET", "GET"})


def downgrade_pickle(data: bytes) -> tuple[bytes, list[str]]:
    """Rewrite one pickle of protocol 3-5 with the opcodes of protocol 2; nothing is run.

    Frames are dropped, short and 8-byte strings become ``BINUNICODE``,
    ``MEMOIZE`` becomes ``LONG_BINPUT`` (memoised strings are inlined where
    they are fetched again), and ``STACK_GLOBAL`` becomes ``GLOBAL``. Every
    other opcode is copied as it is, so objects the safe loader refuses are
    still refused.

    Parameters
    ----------
    data : bytes
        One pickle, up to and including its ``STOP`` opcode (bytes after it
        are ignored).

    Returns
    -------
    pickled : bytes
        The same object as a protocol-2 pickle.
    globals : list of str
        The ``module.name`` of every global it references, in order.

    Raises
    ------
    ValueError
        The bytes are not a well-formed pickle, or a ``STACK_GLOBAL`` takes
        names that are not strings pushed just before it.

    Examples
    --------
    >>> import pickle
    >>> from collections import OrderedDict
    >>> data = pickle.dumps(OrderedDict(a=[1, 2], b="x"), protocol=4)
    >>> old, names = downgrade_pickle(data)
    >>> old[:2], names, pickle.loads(old) == OrderedDict(a=[1, 2], b="x")
    (b'\\x80\\x02', ['collections.OrderedDict'], True)
    """
    out = bytearray()
    pending: list[str] = []  # strings pushed but not yet written: a STACK_GLOBAL may take them
    strings: dict[int, str] = {}  # memo key -> string, inlined when fetched
    renumbered: dict[int, int] = {}  # memo key -> key in the rewritten pickle
    keys: set[int] = set()
    names: list[str] = []

    def flush() -> None:
        for text in pending:
            raw = text.encode("utf-8", "surrogatepass")
            out.extend(b"X" + struct.pack("<I", len(raw)) + raw)
        pending.clear()

    for op, arg, start, stop in _opcodes(data):
        name = op.name
        if name == "PROTO":
            out.extend(b"\x80\x02")
        elif name == "FRAME":
            continue
        elif name in _STRINGS:
            pending.append(str(arg))
        elif name in _PUTS:
            key = len(keys) if name == "MEMOIZE" else int(arg)  # type: ignore[arg-type]
            keys.add(key)
            if pending:
                strings[key] = pending[-1]
            else:
                renumbered[key] = len(renumbered)
                out.extend(b"r" + struct.pack("<I", renumbered[key]))
        elif name in _GETS:
            key = int(arg)  # type: ignore[arg-type]
            if key in strings:
                pending.append(strings[key])
            elif key in renumbered:
                flush()
                out.extend(b"j" + struct.pack("<I", renumbered[key]))
            else:
                raise ValueError(f"memo key {key} is fetched before it is stored")
        elif name == "STACK_GLOBAL":
            if len(pending) < 2:
                raise ValueError("STACK_GLOBAL takes names that are not strings pushed before it")
            module, attribute = pending[-2:]
            del pending[-2:]
            if "\n" in module or "\n" in attribute:
                raise ValueError("a global's module or name holds a line break")
            flush()
            names.append(f"{module}.{attribute}")
            out.extend(b"c" + f"{module}\n{attribute}\n".encode("utf-8", "surrogatepass"))
        else:
            flush()
            if name == "GLOBAL":
                names.append(str(arg).replace(" ", ".", 1))
            out.extend(data[start:stop])
            if name == "STOP":
                break
    return bytes(out), names


def _opcodes(data: bytes) -> Iterator[tuple[pickletools.OpcodeInfo, object, int, int]]:
    """Each opcode with its argument and its byte span ``[start, stop)`` in ``data``."""
    previous: tuple[pickletools.OpcodeInfo, object, int] | None = None
    for op, arg, position in pickletools.genops(data):
        if previous is not None:
            yield (*previous, int(position))  # type: ignore[arg-type]
        previous = (op, arg, int(position))  # type: ignore[arg-type]
    if previous is not None:
        yield (*previous, previous[2] + 1)


def pickle_protocol(path: Path) -> int | None:
    """The pickle protocol a ``torch.save`` file was written with, or None if unknown.

    Examples
    --------
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "m.pt"
    >>> torch.save({"w": torch.ones(1)}, path, pickle_protocol=4)
    >>> pickle_protocol(path)
    4
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                info = _data_pickle(archive)
                if info is None or info.compress_type != zipfile.ZIP_STORED:
                    return None
                with archive.open(info) as handle:
                    head = handle.read(2)
        else:
            with open(path, "rb") as handle:
                head = handle.read(2)
    except Exception:  # zipfile raises many kinds on a corrupt archive; torch.load reports it
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 else None


def _data_pickle(archive: zipfile.ZipFile) -> zipfile.ZipInfo | None:
    found = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")]
    return found[0] if len(found) == 1 else None


def load_any_protocol(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` for a file pickled with any protocol.

    Raises
    ------
    ValueError
        The pickle is malformed or the zip archive is not as ``torch.save``
        writes it.
    pickle.UnpicklingError
        The safe loader refuses what the file holds (objects other than
        tensors and containers).
    """
    with open(path, "rb") as handle:
        if zipfile.is_zipfile(handle):
            stream = _rewritten_archive(handle)
        else:
            stream = _rewritten_legacy(handle)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 2 ..."
            return torch.load(io.BufferedReader(stream), map_location="cpu", weights_only=True)


def _rewritten_archive(handle: io.BufferedReader) -> _SplicedFile:
    """The zip archive with its ``data.pkl`` replaced by the protocol-2 rewrite.

    The new record and a new central directory are appended in memory after
    the original records, which are read from the file as they are.
    """
    handle.seek(0)
    with zipfile.ZipFile(handle) as archive:
        info = _data_pickle(archive)
        if info is None or info.compress_type != zipfile.ZIP_STORED:
            raise ValueError("not a torch.save archive (no single stored data.pkl)")
        pickled, _ = downgrade_pickle(archive.read(info))
        directory = archive.start_dir
    stream = _SplicedFile(handle, b"", 0, directory)
    with zipfile.ZipFile(stream, "a") as archive:
        old = archive.NameToInfo.pop(info.filename)
        archive.filelist.remove(old)
        archive.writestr(info.filename, pickled, compress_type=zipfile.ZIP_STORED)
    stream.seek(0)
    return stream


def _rewritten_legacy(handle: io.BufferedReader) -> _SplicedFile:
    """The legacy format with its five pickles rewritten; the tensor data follow unchanged."""
    end = handle.seek(0, io.SEEK_END)
    handle.seek(0)
    prefix = bytearray()
    bounded = _BoundedReader(handle, end)
    for _ in range(_LEGACY_PICKLES):
        start = handle.tell()
        for _op in pickletools.genops(bounded):
            pass
        stop = handle.tell()
        handle.seek(start)
        pickled, _ = downgrade_pickle(handle.read(stop - start))
        prefix.extend(pickled)
    return _SplicedFile(handle, bytes(prefix), handle.tell(), None)


class _BoundedReader:
    """Reads of a file that never ask for more than the file holds.

    A crafted length field (a string of 2**50 bytes) would otherwise make
    ``read`` allocate that much before finding the file too short.
    """

    def __init__(self, handle: io.BufferedReader, end: int) -> None:
        self._handle = handle
        self._end = end

    def _left(self) -> int:
        return max(0, self._end - self._handle.tell())

    def read(self, size: int = -1) -> bytes:
        return self._handle.read(self._left() if size < 0 else min(size, self._left()))

    def readline(self) -> bytes:
        return self._handle.readline(self._left())

    def tell(self) -> int:
        return self._handle.tell()


class _SplicedFile(io.RawIOBase):
    """A seekable stream: ``prefix`` + bytes ``[start, stop)`` of a file + a writable tail.

    The tail starts as the file's bytes from ``stop`` on (``stop`` None: the
    file's end); writes are allowed only there and stay in memory.
    """

    def __init__(
        self, handle: io.BufferedReader, prefix: bytes, start: int, stop: int | None
    ) -> None:
        super().__init__()
        self._handle = handle
        self._prefix = prefix
        self._start = start
        handle.seek(0, io.SEEK_END)
        end = handle.tell()
        self._stop = end if stop is None else stop
        handle.seek(self._stop)
        self._tail = bytearray(handle.read(end - self._stop))
        self._fixed = len(prefix) + self._stop - start
        self._position = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _size(self) -> int:
        return self._fixed + len(self._tail)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size()}[whence]
        if base + offset < 0:
            raise OSError("negative seek position")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._position < self._size():
            want = len(view) - done
            position = self._position
            if len(self._prefix) <= position < self._fixed:  # straight from the file, no copy
                self._handle.seek(self._start + position - len(self._prefix))
                count = self._handle.readinto(view[done : done + min(want, self._fixed - position)])
                if not count:
                    break
            else:
                if position < len(self._prefix):
                    chunk = self._prefix[position : position + want]
                else:
                    offset = position - self._fixed
                    chunk = bytes(self._tail[offset : offset + want])
                count = len(chunk)
                view[done : done + count] = chunk
            done += count
            self._position += count
        return done

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        raw = bytes(data)
        offset = self._position - self._fixed
        if offset < 0:
            raise OSError("only the end of a spliced file can be written")
        if offset > len(self._tail):
            self._tail.extend(bytes(offset - len(self._tail)))
        self._tail[offset : offset + len(raw)] = raw
        self._position += len(raw)
        return len(raw)

    def truncate(self, size: int | None = None) -> int:
        size = self._position if size is None else size
        if size < self._fixed:
            raise OSError("only the end of a spliced file can be truncated")
        del self._tail[size - self._fixed :]
        return size
