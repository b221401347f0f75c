"""A model with a PEFT LoRA adapter applied as its tensors are read: mergekit's ``MODEL+LORA``.

mergekit reads a model reference ``MODEL+LORA`` by loading MODEL with
transformers, applying the adapter with PEFT's ``merge_and_unload`` and saving
the result (in float32 unless ``--lora-merge-dtype`` says otherwise) to a
cache folder, which it then merges. :class:`AdaptedCheckpoint` gives the same
tensors without that copy: each one is read from MODEL and, when the adapter
changes it, updated as PEFT updates it (the low-rank products in float64,
rounded once to float32: within a float32 rounding of PEFT's float32 products,
and a block of rows is exactly those rows of the whole tensor):

- a LoRA linear weight: ``W + transpose(B @ A) * scale`` (``transpose`` when
  ``fan_in_fan_out``, and for GPT-2's ``Conv1D`` layers, as PEFT does), with
  ``scale = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``; ``rank_pattern``
  and ``alpha_pattern`` per module);
- its bias, with ``lora_bias``: ``b + lora_B.bias * scale``;
- a LoRA embedding: ``W + (lora_embedding_B @ lora_embedding_A)^T * scale``;
- a module stored whole (``modules_to_save``): the adapter's tensor.

Adapters PEFT merges otherwise (DoRA, convolutions, other PEFT types) are
refused with one line. Memory stays one tensor (or one block of rows) at a time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from modelfuse.checkpoint.base import Checkpoint, TensorInfo
from modelfuse.checkpoint.reader import open_checkpoint
from modelfuse.errors import CheckpointError

__all__ = ["ADAPTER_PREFIX", "AdaptedCheckpoint", "conv1d_modules", "open_adapted"]

ADAPTER_PREFIX = "base_model.model."
"""What PEFT puts before a module's name in an adapter's tensor names."""

_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
_CONV1D_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})


def conv1d_modules(folder: Path | None) -> frozenset[str]:
    """The last name parts of the modules stored as transformers' ``Conv1D`` (weight
    ``(in, out)``, the transpose of a linear layer's) in the model folder's architecture:
    GPT-2's ``c_attn``, ``c_proj``, ``c_fc`` and ``q_attn``; none for other models.

    PEFT treats these as ``fan_in_fan_out`` whatever the adapter's configuration says.
    """
    if folder is None or not (folder / "config.json").is_file():
        return frozenset()
    try:
        if (folder / "config.json").stat().st_size > _MAX_CONFIG_BYTES:
            return frozenset()
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return frozenset()
    kind = config.get("model_type") if isinstance(config, dict) else None
    return _CONV1D_NAMES if kind in _CONV1D_MODEL_TYPES else frozenset()
_MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class _Update:
    """How one model tensor changes: ``kind`` is lora, embedding, bias or whole."""

    kind: str
    first: str  # lora_A / lora_embedding_A / lora_B.bias / the whole tensor
    second: str | None = None  # lora_B / lora_embedding_B
    scale: float = 1.0
    transpose: bool = False
    base: str | None = None  # the adapter's own copy of the tensor the update starts from


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: no adapter_config.json; a MODEL+LORA reference names a PEFT LoRA "
            "adapter folder (adapter_config.json and adapter_model.safetensors) after the '+'"
        )
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: larger than 1 MiB; expected a PEFT adapter_config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{path}: not readable JSON ({exc}); expected PEFT's adapter_config.json"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(
            f"{path}: peft_type {str(kind)[:40]!r}; only LoRA adapters (peft_type LORA) can be "
            "applied: merge this adapter into its model with PEFT first"
        )
    if config.get("use_dora"):
        raise CheckpointError(
            f"{path}: a DoRA adapter (use_dora: true); only plain LoRA adapters are applied: "
            "merge it into its model with PEFT's merge_and_unload first"
        )
    return config


def _number(config: dict[str, Any], key: str, path: Path, default: float | None = None) -> float:
    value = config.get(key, default)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise CheckpointError(
            f"{path}: {key}: expected a positive number, got {str(value)[:40]!r}; fix "
            "adapter_config.json"
        )
    return float(value)


def _pattern_value(patterns: Any, module: str, default: float, key: str, path: Path) -> float:
    """PEFT's per-module ``rank_pattern``/``alpha_pattern``: the first key that matches the
    module name's end (``(.*\\.)?KEY$``), else ``default``."""
    if not patterns:
        return default
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{path}: {key}: expected a mapping of module patterns to numbers")
    for pattern, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({pattern})$", module)
        except re.error as exc:
            raise CheckpointError(
                f"{path}: {key}: {str(pattern)[:60]!r} is not a pattern ({exc})"
            ) from None
        if matched:
            return _number({key: value}, key, path)
    return default


def _same_shape(stored: TensorInfo, model: TensorInfo, where: Path) -> None:
    if tuple(stored.shape) != tuple(model.shape):
        raise CheckpointError(
            f"{where}: {stored.name!r} has shape {list(stored.shape)} but {model.name} has "
            f"{list(model.shape)}; was the model's vocabulary resized?"
        )


class AdaptedCheckpoint(Checkpoint):
    """``model`` with the PEFT LoRA adapter in ``adapter`` applied (see the module).

    Parameters
    ----------
    model : Checkpoint
        The model the adapter was trained on. Closed with this checkpoint.
    adapter : path
        The adapter folder (``adapter_config.json``, ``adapter_model.safetensors``
        or ``.bin``).
    dtype : torch.dtype or None, default torch.float32
        The dtype every tensor is read in, as mergekit's merged copy holds them
        (``--lora-merge-dtype``; float32 by default); None keeps each tensor's own.

    Examples
    --------
    >>> import os, tempfile, json, torch
    >>> from safetensors.torch import save_file
    >>> from modelfuse.checkpoint import open_checkpoint
    >>> d = tempfile.mkdtemp()
    >>> save_file({"fc.weight": torch.zeros(2, 3)}, os.path.join(d, "model.safetensors"))
    >>> os.mkdir(os.path.join(d, "lora"))
    >>> _ = open(os.path.join(d, "lora", "adapter_config.json"), "w").write(
    ...     json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2}))
    >>> save_file({"base_model.model.fc.lora_A.weight": torch.ones(1, 3),
    ...            "base_model.model.fc.lora_B.weight": torch.ones(2, 1)},
    ...           os.path.join(d, "lora", "adapter_model.safetensors"))
    >>> with AdaptedCheckpoint(open_checkpoint(d), os.path.join(d, "lora")) as ckpt:
    ...     ckpt.read("fc.weight").tolist()
    [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """

    def __init__(
        self, model: Checkpoint, adapter: str | Path, *, dtype: torch.dtype | None = torch.float32
    ) -> None:
        folder = Path(adapter)
        super().__init__(Path(f"{model.path}+{folder}"), model.folder)
        self.model = model
        self.adapter_folder = folder
        self.dtype = dtype
        config = _read_config(folder)
        weights = next((folder / name for name in _WEIGHT_FILES if (folder / name).is_file()), None)
        if weights is None:
            raise CheckpointError(
                f"{folder}: no adapter_model.safetensors (or .bin); expected a PEFT adapter folder"
            )
        self.adapter = open_checkpoint(weights)
        try:
            self._updates = self._plan(config, folder / "adapter_config.json")
        except BaseException:
            self.adapter.close()
            raise
        for name in model.keys():
            info = model.info(name)
            kept = info.dtype if dtype is None or not info.dtype.is_floating_point else dtype
            size = math.prod(info.shape) * kept.itemsize
            self._infos[name] = TensorInfo(name, info.shape, kept, size, info.file)

    def _plan(self, config: dict[str, Any], path: Path) -> dict[str, _Update]:
        r = _number(config, "r", path, 8)
        alpha = _number(config, "lora_alpha", path, 8)
        rslora = bool(config.get("use_rslora", False))
        fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        conv1d = conv1d_modules(self.model.folder)  # PEFT transposes these whatever the flag
        names = set(self.adapter.keys())
        updates: dict[str, _Update] = {}
        used: set[str] = set()

        def scale_of(module: str) -> float:
            rank = _pattern_value(config.get("rank_pattern"), module, r, "rank_pattern", path)
            a = _pattern_value(config.get("alpha_pattern"), module, alpha, "alpha_pattern", path)
            return a / math.sqrt(rank) if rslora else a / rank

        def target(name: str, module_name: str) -> TensorInfo:
            if name not in self.model:
                raise CheckpointError(
                    f"{self.adapter.path}: {module_name} changes {name!r}, which "
                    f"{self.model.path} does not hold; expected an adapter trained on this model"
                )
            return self.model.info(name)

        def pair(name: str, first: str, second: str, kind: str) -> None:
            module = name[len(ADAPTER_PREFIX) : -len(first)]
            other = ADAPTER_PREFIX + module + second
            if other not in names:
                raise CheckpointError(f"{self.adapter.path}: {name!r} has no {other!r} beside it")
            a, b = self.adapter.info(name).shape, self.adapter.info(other).shape
            weight = target(module + ".weight", name)
            if len(a) != 2 or len(b) != 2:
                raise CheckpointError(
                    f"{self.adapter.path}: {name!r} has shape {list(a)}; only linear and embedding "
                    "LoRA (2-D factors) are applied: merge this adapter with PEFT first"
                )
            transpose = kind == "embedding" or fan_in_fan_out or module.rsplit(".", 1)[-1] in conv1d
            rows, columns = (a[1], b[0]) if transpose else (b[0], a[1])
            if a[0] != b[1] or tuple(weight.shape) != (rows, columns):
                raise CheckpointError(
                    f"{self.adapter.path}: {module}: factors {list(b)} @ {list(a)} do not fit "
                    f"{weight.name} {list(weight.shape)}; expected an adapter trained on this model"
                )
            rank = _pattern_value(config.get("rank_pattern"), module, r, "rank_pattern", path)
            if rank != a[0]:
                raise CheckpointError(
                    f"{path}: {module} has rank {a[0]} but the configuration says {rank:g}; "
                    "fix r or rank_pattern"
                )
            updates[weight.name] = _Update(kind, name, other, scale_of(module), transpose)
            used.update((name, other))

        for name in sorted(names):
            if not name.startswith(ADAPTER_PREFIX):
                raise CheckpointError(
                    f"{self.adapter.path}: tensor {name!r} does not start with {ADAPTER_PREFIX!r}; "
                    "expected a PEFT adapter saved with save_pretrained"
                )
            if name.endswith(".lora_A.weight"):
                pair(name, ".lora_A.weight", ".lora_B.weight", "lora")
            elif name.endswith(".lora_embedding_A"):
                pair(name, ".lora_embedding_A", ".lora_embedding_B", "embedding")
            elif "lora_magnitude_vector" in name:
                raise CheckpointError(
                    f"{self.adapter.path}: {name!r} is DoRA's; only LoRA is applied"
                )
        for name in sorted(names - used):
            if name.endswith((".lora_B.weight", ".lora_embedding_B")):
                raise CheckpointError(f"{self.adapter.path}: {name!r} has no lora_A beside it")
            rest = name[len(ADAPTER_PREFIX) :]
            if name.endswith(".lora_B.bias"):
                module = rest[: -len(".lora_B.bias")]
                bias = target(module + ".bias", name)
                updates[bias.name] = _Update("bias", name, scale=scale_of(module))
                continue
            if ".base_layer." in rest:  # PEFT saved the layer under the adapter (a resized
                # embedding, save_embedding_layers): it replaces the model's, LoRA applies to it
                own = rest.replace(".base_layer.", ".")
                whole = target(own, name)
                _same_shape(self.adapter.info(name), whole, self.adapter.path)
                present = updates.get(own)
                updates[own] = (
                    _Update("whole", name) if present is None else replace(present, base=name)
                )
                continue
            if ".lora_" in rest:
                raise CheckpointError(
                    f"{self.adapter.path}: {name!r} is a kind of LoRA tensor modelfuse does not "
                    "apply; merge this adapter into its model with PEFT first"
                )
            _same_shape(self.adapter.info(name), target(rest, name), self.adapter.path)
            updates[rest] = _Update("whole", name)
        return updates

    def updated(self) -> list[str]:
        """The names of the tensors the adapter changes."""
        return sorted(self._updates)

    def read(self, name: str) -> torch.Tensor:
        return self._read(name, None)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        self._check_rows(name, start, stop)
        return self._read(name, (start, stop))

    @staticmethod
    def _part(source: Checkpoint, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """Tensor ``name`` of ``source``, or only those rows of it (only their bytes read)."""
        return source.read(name) if rows is None else source.read_rows(name, *rows)

    def _read(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        dtype = self.info(name).dtype
        update = self._updates.get(name)
        if update is None:
            return self._part(self.model, name, rows).to(dtype)
        if update.kind == "whole":
            return self._part(self.adapter, update.first, rows).to(dtype)
        start = (
            self._part(self.adapter, update.base, rows)
            if update.base is not None
            else self._part(self.model, name, rows)
        )
        if update.kind == "bias":
            change = self._part(self.adapter, update.first, rows).float() * update.scale
            return (start.float() + change).to(dtype)
        # float64 products, rounded once: a block of rows then gets the bits of those rows of
        # the whole tensor (float32 products of other shapes take other kernels, which round
        # differently), and the result is within a float32 rounding of PEFT's
        second = update.second or ""
        if update.transpose:  # the rows of the product are columns of A (small: r x rows)
            a = self.adapter.read(update.first).double()
            a = a if rows is None else a[:, rows[0] : rows[1]]
            b = self.adapter.read(second).double()
        else:  # the rows of B
            a = self.adapter.read(update.first).double()
            b = self._part(self.adapter, second, rows).double()
        product = b @ a
        delta = (product.T if update.transpose else product) * update.scale
        return (start.double() + delta).float().to(dtype)

    def close(self) -> None:
        self.model.close()
        self.adapter.close()


def open_adapted(
    model: str | Path, adapter: str | Path, *, dtype: torch.dtype | None = torch.float32
) -> AdaptedCheckpoint:
    """Open ``model`` with the LoRA adapter folder ``adapter`` applied (mergekit's
    ``MODEL+LORA``); see :class:`AdaptedCheckpoint`."""
    opened = open_checkpoint(model)
    try:
        return AdaptedCheckpoint(opened, adapter, dtype=dtype)
    except BaseException:
        opened.close()
        raise
