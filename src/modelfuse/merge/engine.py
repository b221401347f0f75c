"""The streaming merge: checkpoints on disk in, one checkpoint on disk out.

Data flows once, tensor by tensor (see DESIGN.md): open every input lazily,
plan (every problem found before any work), optionally prepare whole-model
values, merge in a small thread pool, and write each tensor as soon as it is
ready into a temporary folder that is moved into place only when complete.
Memory is bounded by a few tensors, never by the model size.

The steps live beside it: :mod:`~modelfuse.merge.open_inputs` (opening and
checking the inputs), :mod:`~modelfuse.merge.config_plan` (the plan of a
configuration), :mod:`~modelfuse.merge.execute` (merging) and
:mod:`~modelfuse.merge.output_files` (what is written beside the weights).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelfuse.checkpoint import CheckpointWriter, parse_size
from modelfuse.errors import ConfigError
from modelfuse.memory import peak_rss_bytes
from modelfuse.merge.config import MergeConfig, load_config
from modelfuse.merge.execute import default_threads, execute_plan
from modelfuse.merge.heads import head_files
from modelfuse.merge.open_inputs import OpenedInputs, open_inputs
from modelfuse.merge.output_files import model_card_text, resolved_yaml, updated_model_config
from modelfuse.merge.parameters import short
from modelfuse.merge.plan import MergePlan, TensorTask
from modelfuse.merge.registry import METHODS

__all__ = ["MergeResult", "close_plan", "describe_plan", "merge", "plan_merge"]


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


def _with_seed(config: MergeConfig, random_seed: int | None) -> MergeConfig:
    """``config`` with ``random_seed`` set for a method that draws random numbers (DARE)."""
    if random_seed is None:
        return config
    method = METHODS.get(config.merge_method)
    if method is None or method.parameters.field_for("random_seed") is None:
        return config  # the method draws nothing: the seed changes nothing
    given = (config.parameters or {}).get("random_seed")
    if given is not None and given != random_seed:
        raise ConfigError(
            f"--random-seed {random_seed}: the configuration sets random_seed: {short(given)}; "
            "give the seed once"
        )
    parameters = {**(config.parameters or {}), "random_seed": random_seed}
    return config.model_copy(update={"parameters": parameters})


def _with_prefix(config: MergeConfig, allow_prefix: bool) -> MergeConfig:
    """The configuration with ``allow_prefix`` on when asked (``--allow-prefix``)."""
    if allow_prefix and not config.allow_prefix:
        return config.model_copy(update={"allow_prefix": True})
    return config


def plan_merge(
    config: str | Path | dict[str, Any] | MergeConfig,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    allow_crimes: bool = False,
    random_seed: int | None = None,
    allow_prefix: bool = False,
) -> MergePlan:
    """Open the inputs and plan the merge without merging; every problem is raised together.

    Parameters
    ----------
    config : path, dict or MergeConfig
        As for :func:`merge`.
    out : path, optional
        The output folder: an existing one (without ``overwrite``) or one that
        is or holds an input is a problem too.
    overwrite, allow_crimes, random_seed, allow_prefix
        As for :func:`merge`.

    Raises
    ------
    ConfigError, CheckpointError, OutputError
        One error listing every problem found (``"N problems:"`` and one line
        each when there are several).

    The checkpoints stay open through the returned plan's sources; close them
    with :func:`close_plan`.
    """
    return open_merge(
        config,
        out,
        overwrite=overwrite,
        allow_crimes=allow_crimes,
        random_seed=random_seed,
        allow_prefix=allow_prefix,
    ).plan


def open_merge(
    config: str | Path | dict[str, Any] | MergeConfig,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    allow_crimes: bool = False,
    random_seed: int | None = None,
    allow_prefix: bool = False,
) -> OpenedInputs:
    """:func:`plan_merge`, with what else the merge writes beside the tensors: the folder
    its model files are copied from and the vocabulary step's tokenizer files."""
    cfg, folder = load_config(config)
    return open_inputs(
        _with_prefix(_with_seed(cfg, random_seed), allow_prefix),
        folder,
        out=out,
        overwrite=overwrite,
        config_file=_config_file(config),
        allow_crimes=allow_crimes,
    )


def close_plan(plan: MergePlan) -> None:
    """Close every file a plan from :func:`plan_merge` holds open (models, statistics, patches)."""
    sources: dict[int, Any] = {}
    for model in [*plan.models, *([plan.base] if plan.base is not None else [])]:
        sources[id(model.source)] = model.source
        if model.statistics is not None:
            sources[id(model.statistics)] = model.statistics
    for task in plan.tasks:
        for patch, _ in task.patches:
            sources[id(patch)] = patch
    for source in sources.values():
        with contextlib.suppress(Exception):
            source.close()


def _config_file(config: str | Path | dict[str, Any] | MergeConfig) -> Path | None:
    return Path(config) if isinstance(config, (str, Path)) else None


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


def merge(
    config: str | Path | dict[str, Any] | MergeConfig,
    out: str | Path,
    *,
    threads: int | None = None,
    shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    model_card: bool = True,
    copy_tokenizer: bool = True,
    allow_crimes: bool = False,
    random_seed: int | None = None,
    allow_prefix: bool = False,
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
        Never an ``out`` that is or holds an input (a model, statistics or
        patch file, the configuration file or its folder).
    progress : callable, optional
        ``progress(tensors_done, bytes_done)`` increments, called as tensors finish.
    model_card : bool, default True
        Write a ``README.md`` naming the method, the inputs, the parameters
        and the modelfuse version.
    copy_tokenizer : bool, default True
        Copy the tokenizer files of the base model (else the first model)
        beside the weights, as ``mergekit-yaml --copy-tokenizer`` does.
    allow_crimes : bool, default False
        Merge model folders whose ``config.json`` names different
        architectures (mergekit's ``--allow-crimes``); refused otherwise.
        Tensor names and shapes must match either way.
    random_seed : int, optional
        The seed of a method's random draws (DARE's ``random_seed``) when the
        configuration does not set it; recorded in ``modelfuse.yaml``.
    allow_prefix : bool, default False
        Turn on the configuration's ``allow_prefix``: models whose tensor names
        are the reference's behind a prefix (a ``BertForSequenceClassification``
        fine-tune of a ``BertModel`` base) are matched; the output takes the
        reference's names. With ``heads: keep`` in the configuration, each
        model's own tensors (its task head) go to ``OUT/heads/NAME/``.

    Returns
    -------
    MergeResult

    Raises
    ------
    ConfigError, CheckpointError, OutputError
        Bad configuration, inputs or output; nothing is written. Every problem
        found before merging is listed in the one error.

    Notes
    -----
    Beside the weights, ``out`` holds ``modelfuse.yaml``, the configuration
    with absolute paths (``modelfuse merge OUT/modelfuse.yaml OTHER`` writes
    the same weights again), ``README.md`` (unless ``model_card=False``) and
    the model folder's non-weight files; its ``config.json`` gets the
    written dtype as ``torch_dtype`` and loses the keys naming one input
    (:data:`DROPPED_CONFIG_KEYS`).

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
    ['README.md', 'model.safetensors', 'modelfuse.yaml']
    """
    started = time.perf_counter()
    cfg, folder = load_config(config)
    cfg = _with_prefix(_with_seed(cfg, random_seed), allow_prefix)
    budget = parse_size(shard_size)
    workers = default_threads() if threads is None else int(threads)
    if workers < 1:
        raise ConfigError(f"threads: expected a positive number, got {threads}")
    opened = open_inputs(
        cfg,
        folder,
        out=out,
        overwrite=overwrite,
        config_file=_config_file(config),
        allow_crimes=allow_crimes,
    )
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
            notes = [*writer.notes, *opened.notes]  # stale temporary folders removed
            step = opened.vocabulary
            vocab_size = step.vocab_size if step is not None else None
            updated = updated_model_config(opened.files_from, plan, vocab_size)
            if updated is not None:
                writer.add_file("config.json", updated[0])
                if updated[1]:  # say what changed, if anything did
                    notes.append(f"config.json: {', '.join(updated[1])}")
            # A built vocabulary's tokenizer (or the base's with a chat template) replaces the copy.
            own = step is not None and step.write(writer, copy_tokenizer, notes)
            if opened.files_from is not None:
                copied = writer.copy_model_files(
                    opened.files_from, tokenizer=copy_tokenizer and not own
                )
                if copied:
                    notes.append(f"copied {', '.join(copied)} from {opened.files_from}")
            for folder_name, content in head_files(plan):
                writer.add_file(folder_name, content)
            if plan.heads:
                notes.append(f"task heads of {len(plan.heads)} models written to heads/")
            writer.add_file("modelfuse.yaml", resolved_yaml(cfg, opened.located))
            if model_card:
                writer.add_file("README.md", model_card_text(cfg, plan, opened.located))
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
        peak_rss=peak_rss_bytes(),
        warnings=[str(w.message) for w in caught],
        notes=notes,
    )
