"""PyTorch checkpoints (``.bin``, ``.pt``, ``.pth``), loaded safely and lazily.

Files are loaded with ``torch.load(weights_only=True)`` only: the restricted
unpickler that accepts tensors and plain containers and refuses arbitrary
objects, so no code from the file runs. Files in torch's zip format (every
``torch.save`` since torch 1.6) are memory-mapped (``mmap=True``), so opening
reads the small pickled structure and no tensor data until a tensor is read.
A nested state dict (``{"state_dict": {...}, "epoch": 3}``) is unwrapped.
Files pickled with protocol 4 or 5 (``torch.save(..., pickle_protocol=4)``), which
the safe loader cannot parse as they are, are rewritten to protocol 2 on the
fly (see :mod:`modelfuse.checkpoint.pickle_protocol`) and read into memory.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from modelfuse.checkpoint.base import Checkpoint, TensorInfo
from modelfuse.checkpoint.names import check_name, preview, tensor_label
from modelfuse.checkpoint.pickle_protocol import load_any_protocol, pickle_protocol
from modelfuse.errors import CheckpointError

__all__ = [
    "TorchCheckpoint",
    "load_state_dict",
]

#: Keys under which training scripts nest the model's state dict, in order of preference.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "model_state", "weights")

_CONVERT = "in code you trust, save its tensors with safetensors.torch.save_file and pass that"


def _holds_tensors(value: object) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


def _unwrap(path: Path, loaded: object) -> Mapping[object, object]:
    """Find the state dict inside what ``torch.load`` returned."""
    current, trail = loaded, []
    while isinstance(current, Mapping):
        nested = [k for k, v in current.items() if isinstance(v, Mapping) and _search(v)]
        preferred = [k for k in NESTED_KEYS if k in nested]
        if preferred:  # before top-level tensors: {"state_dict": {...}, "best_score": tensor}
            key = preferred[0]
        elif _holds_tensors(current):
            break
        elif len(nested) == 1:
            key = nested[0]
        elif nested:
            names = ", ".join(repr(k) for k in nested[:6])
            raise CheckpointError(
                f"{path}: holds several nested dicts of tensors ({names}) and none is named "
                f"{' or '.join(repr(k) for k in NESTED_KEYS[:3])}; expected one state dict; "
                "save the one you want to merge on its own"
            )
        else:
            break
        trail.append(key)
        current = current[key]
    if not isinstance(current, Mapping) or not _holds_tensors(current):
        found = type(loaded).__name__
        where = "".join(f"[{preview(k)}]" for k in trail)
        raise CheckpointError(
            f"{path}{where}: holds no tensors (found a {found}); expected a state dict mapping "
            "names to tensors; pass a checkpoint of model weights"
        )
    return current


def _search(value: Mapping[object, object], depth: int = 0) -> bool:
    if _holds_tensors(value):
        return True
    if depth >= 4:
        return False
    return any(isinstance(v, Mapping) and _search(v, depth + 1) for v in value.values())


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load the state dict of a PyTorch checkpoint without unpickling arbitrary objects.

    Parameters
    ----------
    path : Path
        A file written by ``torch.save``.

    Returns
    -------
    dict of str to torch.Tensor
        Name -> tensor; tensors of zip-format files are memory-mapped views of
        the file (no data read yet). Non-tensor entries are left out.

    Raises
    ------
    CheckpointError
        The file is not a PyTorch checkpoint or is corrupt, holds objects other
        than tensors and containers, or holds no tensors.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
    >>> torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
    >>> list(load_state_dict(Path(path)))
    ['w']
    """
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise CheckpointError(
            f"{path}: cannot be opened ({exc.strerror}); check the path and its permissions"
        ) from None
    is_zip = magic.startswith(b"PK")  # a truncated zip is reported by torch.load below
    if not is_zip and not magic.startswith(b"\x80"):
        raise CheckpointError(
            f"{path}: is not a PyTorch checkpoint (expected a file written by torch.save, found "
            f"bytes {magic!r}); pass a .safetensors, .bin or .pt file of model weights"
        )
    protocol = pickle_protocol(path)
    try:
        if protocol is not None and protocol >= 4:
            loaded = load_any_protocol(path)
        else:
            with warnings.catch_warnings():  # protocol 3 loads as it is; torch warns all the same
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        opcode = re.search(r"Unsupported operand (\d+)", message)
        if opcode and not found:  # not an object: bytes no pickle of tensors holds
            raise _corrupt(
                path, ValueError(f"pickle opcode {opcode.group(1)} out of place")
            ) from None
        if found or "Weights only load failed" in message:
            what = f" ({preview(found.group(1))[1:-1]})" if found else ""
            raise CheckpointError(
                f"{path}: holds objects other than tensors{what}, which modelfuse does not "
                f"unpickle (weights_only=True: no code from a file runs); {_CONVERT}"
            ) from None
        raise _corrupt(path, exc) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError... on bad files
        raise _corrupt(path, exc) from None
    state = _unwrap(path, loaded)
    result: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if not isinstance(key, str):
            raise CheckpointError(
                f"{path}: tensor key {preview(key)} is a {type(key).__name__}, expected a string "
                "name; save the state dict with string keys"
            )
        check_name(key, str(path), "rename the tensor and save the checkpoint again")
        if value.is_meta:
            raise CheckpointError(
                f"{path}: tensor {tensor_label(key)} is on the meta device (a shape without "
                "data); expected weights; save the model after its weights are loaded"
            )
        if value.layout != torch.strided or value.is_quantized:
            raise CheckpointError(
                f"{path}: tensor {tensor_label(key)} is {value.layout} or quantized; expected "
                "dense tensors; convert it to a dense tensor before merging"
            )
        result[key] = value
    return result


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return CheckpointError(
        f"{path}: cannot be loaded as a PyTorch checkpoint ({reason}); the file is truncated, "
        "corrupt or not a checkpoint; re-save or re-download it"
    )


class TorchCheckpoint(Checkpoint):
    """A checkpoint of one or several PyTorch files, loaded with ``weights_only=True``.

    Use :func:`modelfuse.checkpoint.open_checkpoint` rather than this class.

    Parameters
    ----------
    path : Path
        What the user gave (file, index file or folder), for messages.
    files : sequence of Path
        The files (shards), in order.
    folder : Path, optional
        The model folder the weights belong to.
    weight_map : mapping of str to Path, optional
        For a sharded checkpoint, the index's tensor -> shard map.
    index : Path, optional
        The index file, for messages.

    Examples
    --------
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "m.pt"
    >>> torch.save({"model": {"w": torch.arange(3)}, "epoch": 1}, path)
    >>> with TorchCheckpoint(path, [path]) as ckpt:
    ...     ckpt.keys(), ckpt.read("w").tolist()
    (['w'], [0, 1, 2])
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
        self._tensors: dict[str, torch.Tensor] = {}
        for file_path in files:
            for name, tensor in load_state_dict(file_path).items():
                if name in self._tensors:
                    raise CheckpointError(
                        f"{file_path}: tensor {tensor_label(name)} is also in "
                        f"{self._infos[name].file}; "
                        "expected each tensor in one shard; remove the duplicate shard"
                    )
                self._tensors[name] = tensor
                self._infos[name] = TensorInfo(
                    name,
                    tuple(tensor.shape),
                    tensor.dtype,
                    tensor.numel() * tensor.element_size(),
                    file_path,
                )
        for name, shard in (weight_map or {}).items():
            info = self._infos.get(name)
            if info is None or info.file != shard:
                raise CheckpointError(
                    f"{index}: names tensor {tensor_label(name)} in shard {shard.name}, but {shard} does not "
                    "hold it; the shard or the index is wrong; "
                    "re-download or re-save the checkpoint"
                )

    def read(self, name: str) -> torch.Tensor:
        """Return a fresh contiguous copy of tensor ``name``."""
        info = self.info(name)
        return self._checked(info, self._copy(self._source(name), info.shape))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Return a fresh contiguous copy of rows ``start:stop`` of tensor ``name``."""
        info = self._check_rows(name, start, stop)
        rows = self._copy(self._source(name)[start:stop], (stop - start, *info.shape[1:]))
        return self._checked(info, rows)

    def _source(self, name: str) -> torch.Tensor:
        source = self._tensors.get(name)
        if source is None:
            raise CheckpointError(
                f"{self.path}: read {tensor_label(name)} after close(); open it again"
            )
        return source

    @staticmethod
    def _copy(source: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty(shape, dtype=source.dtype)
        out.copy_(source)
        return out

    def close(self) -> None:
        """Drop the memory-mapped tensors; idempotent."""
        self._tensors = {}
