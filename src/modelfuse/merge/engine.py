"""The streaming merge: checkpoints on disk in, one checkpoint on disk out.

Data flows once, tensor by tensor (see DESIGN.md): open every input lazily,
plan (every problem found before any work), optionally prepare whole-model
values, merge in a small thread pool, and write each tensor as soon as it is
ready into a temporary folder that is moved into place only when complete.
Memory is bounded by a few tensors, never by the model size.
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from modelfuse.checkpoint import Checkpoint, CheckpointWriter, open_checkpoint, parse_size
from modelfuse.errors import ConfigError
from modelfuse.merge.config import MergeConfig, load_config, resolve_dtype
from modelfuse.merge.execute import default_threads, execute_plan
from modelfuse.merge.patch import PatchSource
from modelfuse.merge.plan import (
    MergePlan,
    ModelInput,
    OutputSlice,
    SliceSource,
    TensorTask,
    attach_patches,
    build_plan,
    build_slice_plan,
)
from modelfuse.merge.registry import MergeMethod, get_method

__all__ = ["MergeResult", "describe_plan", "merge", "plan_merge"]


@dataclass(frozen=True)
class MergeResult:
    """What a merge did.

    Attributes
    ----------
    out : Path
        The written model folder.
    tensors : int
        Tensors written.
    bytes : int
        Bytes of tensor data written.
    seconds : float
        Wall time of the merge.
    peak_rss : int
        Peak resident memory of this process, in bytes.
    warnings : list of str
        Warnings raised on the way (NaN or inf inputs, ...).
    notes : list of str
        What the merge decided for you (files copied, base dropped from models, ...).
    """

    out: Path
    tensors: int
    bytes: int
    seconds: float
    peak_rss: int
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: tensors, bytes, seconds, peak memory."""
        return (
            f"merged {self.tensors} tensors ({self.bytes / 1e9:.3f} GB) into {self.out} "
            f"in {self.seconds:.1f} s; peak memory {self.peak_rss / 1e6:.0f} MB"
        )


def _peak_rss() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def _locate(reference: str, folder: Path) -> str:
    path = Path(reference).expanduser()
    if path.is_absolute() or path.exists():
        return str(path)
    beside = folder / path
    return str(beside) if beside.exists() else reference


@dataclass
class _Opened:
    plan: MergePlan
    config: MergeConfig
    checkpoints: list[Checkpoint | PatchSource]
    files_from: Path | None
    notes: list[str]


def _open_all(config: MergeConfig, folder: Path) -> _Opened:
    method = get_method(config.merge_method)
    opened: dict[str, Checkpoint] = {}
    notes: list[str] = []

    def get(reference: str) -> Checkpoint:
        location = _locate(reference, folder)
        key = str(Path(location).resolve()) if Path(location).exists() else location
        if key not in opened:
            opened[key] = open_checkpoint(location)
        return opened[key]

    compute = resolve_dtype(config.dtype)
    out_dtype = resolve_dtype(config.out_dtype, key="out_dtype")
    patch_sources: list[PatchSource] = []
    try:
        base_ckpt = get(config.base_model) if config.base_model is not None else None
        if config.slices is not None:
            plan = _slice_plan(config, method, get, compute, out_dtype)
            first = plan.models[0].source
            files_from = base_ckpt.folder if base_ckpt is not None else first.folder
            _open_patches(config, plan, folder, patch_sources)
            return _Opened(plan, config, [*opened.values(), *patch_sources], files_from, notes)
        entries = list(config.models or [])
        if base_ckpt is not None and method.uses_base:
            kept = [e for e in entries if get(e.model) is not base_ckpt]
            if len(kept) < len(entries):
                notes.append(f"{config.base_model} is the base model; it is not merged as a model")
            entries = kept
        models = [
            ModelInput(
                label=entry.model,
                source=get(entry.model),
                parameters=dict(entry.parameters or {}),
                statistics=None if entry.statistics is None else get(entry.statistics),
            )
            for entry in entries
        ]
        if not models:
            raise ConfigError(
                "models: nothing to merge besides the base model; list at least one other model"
            )
        base = None
        if base_ckpt is not None and method.uses_base:
            base = ModelInput(label=config.base_model or "base", source=base_ckpt)
        plan = build_plan(
            method,
            models,
            base,
            config.parameters or {},
            compute_dtype=compute,
            out_dtype=out_dtype,
        )
        _open_patches(config, plan, folder, patch_sources)
    except BaseException:
        for ckpt in [*opened.values(), *patch_sources]:
            ckpt.close()
        raise
    files_from = base_ckpt.folder if base_ckpt is not None else models[0].source.folder
    return _Opened(
        plan, config, [*opened.values(), *patch_sources], files_from, notes + plan.notes
    )


def _open_patches(
    config: MergeConfig, plan: MergePlan, folder: Path, sources: list[PatchSource]
) -> None:
    entries = []
    for entry in config.patches or []:
        source = PatchSource(_locate(entry.patch, folder))
        sources.append(source)
        entries.append((entry.patch, source, entry.scale))
    attach_patches(plan, entries)


def _slice_plan(
    config: MergeConfig,
    method: MergeMethod,
    get: Callable[[str], Checkpoint],
    compute: torch.dtype | None,
    out_dtype: torch.dtype | None,
) -> MergePlan:
    slices = []
    for number, entry in enumerate(config.slices or []):
        sources = [
            SliceSource(
                ModelInput(
                    label=f"{src.model} layers {src.layer_range[0]}-{src.layer_range[1] - 1}",
                    source=get(src.model),
                    parameters=dict(src.parameters or {}),
                ),
                src.layer_range,
            )
            for src in entry.sources
        ]
        base_ref = entry.base_model or config.base_model
        base = None
        if base_ref is not None and method.uses_base:
            base_ckpt = get(base_ref)
            matches = [s for s in sources if s.model.source is base_ckpt]
            if not matches:
                raise ConfigError(
                    f"slices[{number}]: the base model {base_ref} is not among the slice's "
                    "sources; add it as a source with the layer range to use"
                )
            base = matches[0]
        slices.append(OutputSlice(sources, base, dict(entry.parameters or {})))
    return build_slice_plan(
        method, slices, config.parameters or {}, compute_dtype=compute, out_dtype=out_dtype
    )


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_VOCAB_ROWS = re.compile(r"embed_tokens\.weight$|wte\.weight$|word_embeddings\.weight$")


def _updated_model_config(files_from: Path | None, plan: MergePlan) -> tuple[str, list[str]] | None:
    """config.json with the output's layer count and vocabulary size, when they changed."""
    if files_from is None or not (files_from / "config.json").is_file():
        return None
    try:
        data = json.loads((files_from / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    changes = []
    if plan.layers is not None:
        for key in _LAYER_KEYS:
            if key in data and data[key] != plan.layers:
                changes.append(f"{key} {data[key]} -> {plan.layers}")
                data[key] = plan.layers
    for task in plan.tasks:
        if task.shared_rows is not None and _VOCAB_ROWS.search(task.name):
            rows = task.shape[0]
            if "vocab_size" in data and data["vocab_size"] != rows:
                changes.append(f"vocab_size {data['vocab_size']} -> {rows}")
                data["vocab_size"] = rows
    if not changes:
        return None
    return json.dumps(data, indent=2) + "\n", changes


def plan_merge(config: str | Path | dict[str, Any] | MergeConfig) -> MergePlan:
    """Open the inputs and plan the merge without merging; every problem is raised.

    The checkpoints stay open through the returned plan's sources; the caller
    may close them with ``for m in plan.models: m.source.close()``.
    """
    cfg, folder = load_config(config)
    return _open_all(cfg, folder).plan


def describe_plan(plan: MergePlan) -> str:
    """A human-readable plan: method, inputs, and one line per output tensor."""
    lines = [
        f"method: {plan.method.name} ({plan.method.summary})",
        f"base: {plan.base.label if plan.base is not None else '(none)'}",
        "models: " + ", ".join(m.label for m in plan.models),
        *([f"output layers: {plan.layers}"] if plan.layers is not None else []),
        *plan.notes,
        f"tensors: {len(plan.tasks)} ({plan.total_bytes / 1e9:.3f} GB to write)",
    ]
    for task in plan.tasks:
        params = ", ".join(
            f"{plan.method.parameters.config_name(k)}={_short(v)}" for k, v in task.parameters.items()
        )
        dtype = str(task.out_dtype).removeprefix("torch.")
        sources = ""
        if any(n != task.name for n in task.inputs) or plan.layers is not None:
            sources = " from " + ", ".join(
                f"{m.label}:{n}" for m, n in zip(task.models, task.inputs)
            )
            if task.base is not None and plan.base is None:
                sources += f"; base {task.base.label}:{task.base_input}"
        lines.append(
            f"  {task.name} {list(task.shape)} {dtype} {task.action}"
            + (f" (layer position {task.t:.3f}) {params}" if task.action == "merge" else "")
            + sources
        )
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def _resolved_yaml(config: MergeConfig, plan: MergePlan) -> str:
    from modelfuse import __version__

    record = {
        "modelfuse_version": __version__,
        "configuration": config.model_dump(mode="json", exclude_none=True),
        "inputs": {
            "base_model": None if plan.base is None else str(plan.base.source.path.resolve()),
            "models": [str(m.source.path.resolve()) for m in plan.models],
        },
    }
    return yaml.safe_dump(record, sort_keys=False)


def merge(
    config: str | Path | dict[str, Any] | MergeConfig,
    out: str | Path,
    *,
    threads: int | None = None,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Merge checkpoints on disk as a configuration says, streaming tensor by tensor.

    Parameters
    ----------
    config : path, dict or MergeConfig
        A mergekit-style configuration (YAML file or mapping).
    out : path
        The output model folder. Written to a temporary folder beside it and
        moved into place only when complete; nothing is left on failure.
    threads : int, optional
        Tensors merged at once (default: all cores).
    shard_size : str or int, default "5GB"
        Largest shard of the output, e.g. ``"500MB"``.
    overwrite : bool, default False
        Replace ``out`` if it exists (only once the new model is complete).
    progress : callable, optional
        ``progress(tensors_done, bytes_done)`` increments, called as tensors finish.

    Returns
    -------
    MergeResult

    Raises
    ------
    ConfigError, CheckpointError, OutputError
        Bad configuration, inputs or output; nothing is written.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> for i in range(2):
    ...     save_file({"w": torch.full((2,), float(i))}, os.path.join(d, f"m{i}.safetensors"))
    >>> cfg = {"merge_method": "linear", "models": [os.path.join(d, "m0.safetensors"),
    ...                                             os.path.join(d, "m1.safetensors")]}
    >>> result = merge(cfg, os.path.join(d, "out"))
    >>> sorted(os.listdir(result.out))
    ['model.safetensors', 'modelfuse.yaml']
    """
    started = time.perf_counter()
    cfg, folder = load_config(config)
    budget = parse_size(shard_size)
    workers = default_threads() if threads is None else int(threads)
    if workers < 1:
        raise ConfigError(f"threads: expected a positive number, got {threads}")
    opened = _open_all(cfg, folder)
    plan = opened.plan
    caught: list[warnings.WarningMessage] = []
    written = 0
    try:
        layout = [(task.name, task.shape, task.out_dtype) for task in plan.tasks]
        with CheckpointWriter(out, layout, shard_size=budget, overwrite=overwrite) as writer:

            def sink(task: TensorTask, tensor: torch.Tensor, start: int | None) -> None:
                if start is None:
                    writer.write(task.name, tensor)
                else:
                    writer.write_rows(task.name, start, tensor)

            remaining = {task.name: task.nbytes for task in plan.tasks}

            def done(task: TensorTask, nbytes: int) -> None:
                nonlocal written
                written += nbytes
                remaining[task.name] -= nbytes
                if progress is not None:
                    progress(1 if remaining[task.name] <= 0 else 0, nbytes)

            with warnings.catch_warnings(record=True) as caught, torch.no_grad():
                warnings.simplefilter("always")
                execute_plan(plan, sink, threads=workers, on_done=done)
            notes = list(opened.notes)
            updated = _updated_model_config(opened.files_from, plan)
            if updated is not None:
                writer.add_file("config.json", updated[0])
                notes.append(f"config.json: {', '.join(updated[1])}")
            if opened.files_from is not None:
                copied = writer.copy_model_files(opened.files_from)
                if copied:
                    notes.append(f"copied {', '.join(copied)} from {opened.files_from}")
            writer.add_file("modelfuse.yaml", _resolved_yaml(cfg, plan))
            path = writer.commit()
    finally:
        for ckpt in opened.checkpoints:
            with contextlib.suppress(Exception):
                ckpt.close()
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return MergeResult(
        out=Path(path),
        tensors=len(plan.tasks),
        bytes=written,
        seconds=time.perf_counter() - started,
        peak_rss=_peak_rss(),
        warnings=[str(w.message) for w in caught],
        notes=notes,
    )
