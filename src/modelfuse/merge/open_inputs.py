"""Opening a merge's inputs and checking them, every problem found before any work.

:func:`open_inputs` opens every model, statistics and patch file a
configuration names (lazily: headers only), refuses mixed architectures
unless asked, checks the output path and the statistics' kind, plans the
merge and raises one error listing every problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from modelfuse.checkpoint import Checkpoint, open_checkpoint
from modelfuse.checkpoint.adapted import open_adapted
from modelfuse.errors import CheckpointError, ConfigError, ModelfuseError
from modelfuse.merge.config import MergeConfig, ModelEntry, resolve_dtype
from modelfuse.merge.config_plan import model_plan, parameter_key_problems, slice_plan
from modelfuse.merge.merge_method import MergeMethod
from modelfuse.merge.output_paths import check_output_path, expand_user
from modelfuse.merge.parameters import short
from modelfuse.merge.patch import PatchSource, attach_patches
from modelfuse.merge.plan import MergePlan
from modelfuse.merge.problems import Problems
from modelfuse.merge.registry import METHODS, get_method
from modelfuse.merge.vocabulary_step import VocabularyStep, check_vocabulary_keys, open_vocabulary

__all__ = ["OpenedInputs", "adapter_reference", "locate", "open_inputs"]


def adapter_reference(
    reference: str, location: str, folder: Path, key: str = "model"
) -> tuple[str, str] | None:
    """``(model, adapter)`` located when ``reference`` is mergekit's ``MODEL+LORA`` (no
    path of that name exists and it has one ``+``), else None.

    Raises
    ------
    CheckpointError
        More than one ``+``, or a part that is not found.
    """
    if "+" not in reference or Path(location).exists():
        return None
    parts = reference.split("+")
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(
            f"{key}: {short(reference)}: neither a path nor MODEL+LORA (one model and one "
            "LoRA adapter folder joined by '+'); check the reference"
        )
    model, adapter = (locate(part, folder, key) for part in parts)
    for part, found in ((parts[0], model), (parts[1], adapter)):
        if not Path(found).exists():
            raise CheckpointError(
                f"{key}: {short(reference)}: {short(part)} is not found (read as MODEL+LORA, "
                "mergekit's model with a LoRA adapter applied); check the path"
            )
    return model, adapter


def locate(reference: str, folder: Path, key: str = "model") -> str:
    """A reference as given (from the working directory), else beside the configuration."""
    path = expand_user(reference, key=key)
    try:
        if path.is_absolute() or path.exists():
            return str(path)
        beside = folder / path
        return str(beside) if beside.exists() else reference
    except OSError as exc:  # a name too long for the file system, a loop of links, ...
        raise CheckpointError(
            f"{key}: {short(reference)}: cannot be looked up ({exc.strerror or exc}); "
            "give the path of a checkpoint file or model folder"
        ) from None


@dataclass
class OpenedInputs:
    plan: MergePlan
    config: MergeConfig
    checkpoints: list[Checkpoint | PatchSource]
    files_from: Path | None
    notes: list[str]
    located: dict[str, str] = field(default_factory=dict)
    vocabulary: VocabularyStep | None = None


_STATISTICS_KIND = "modelfuse.statistics"


_KIND_NAMES = {"fisher": "Fisher diagonals", "gram": "Gram matrices"}


def _statistics_problems(
    method: MergeMethod, label: str, statistics: Checkpoint, model: Checkpoint | None
) -> list[str]:
    """A statistics file of another kind than the method reads, or matching none of the tensors."""
    problems = []
    kind = getattr(statistics, "metadata", {}).get(_STATISTICS_KIND)
    wanted = method.statistics[0] if method.statistics else None
    if wanted is not None and kind in _KIND_NAMES and kind != wanted:
        users = sorted(name for name, m in METHODS.items() if kind in m.statistics)
        problems.append(
            f"{label}: holds {_KIND_NAMES[kind]} (`modelfuse statistics {kind}`, for "
            f"{', '.join(users)}); merge method {method.name!r} needs {_KIND_NAMES[wanted]}: "
            f"compute them with `modelfuse statistics {wanted}`"
        )
    elif model is not None and not any(name in model for name in statistics.keys()):
        problems.append(
            f"{label}: none of its {len(statistics.keys())} tensor names is a tensor of the "
            "model; compute the statistics on this model with `modelfuse statistics`"
        )
    return problems


def _base_statistics(
    config: MergeConfig,
    method: MergeMethod | None,
    get: Callable[..., Checkpoint | None],
    problems: Problems,
) -> Checkpoint | None:
    """Open ``base_statistics`` when the method reads it; otherwise say why it is refused."""
    reason = None
    if config.base_model is None:
        reason = "there is no base_model; set base_model to the model these statistics describe"
    elif config.slices is not None:
        reason = "slices merge no base statistics; list the models under models: instead"
    elif method is not None and not method.base_statistics:
        readers = sorted(name for name, m in METHODS.items() if m.base_statistics)
        reason = (
            f"merge method {method.name!r} does not read the base model's statistics (read by "
            f"{', '.join(readers)}); leave base_statistics out"
        )
    if reason is not None:
        problems.add(f"base_statistics: {reason}", ConfigError)
        return None
    return get(config.base_statistics, "base_statistics", "statistics file")


def open_inputs(
    config: MergeConfig,
    folder: Path,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    config_file: Path | None = None,
    allow_crimes: bool = False,
) -> OpenedInputs:
    """Open every input and plan the merge; every problem found is raised together.

    The problems are collected across every check (unknown method or
    parameters, missing or unreadable models, statistics of the wrong kind,
    out-of-range values, mismatched tensors, an output that exists or is an
    input) and raised as one error listing them.
    """
    problems = Problems()
    method = problems.check(lambda: get_method(config.merge_method))
    opened: dict[str, Checkpoint] = {}
    failed: set[str] = set()
    located: dict[str, str] = {}
    notes: list[str] = []
    patch_sources: list[PatchSource] = []
    inputs: list[tuple[str, str | Path]] = []

    def get(reference: str, key: str, what: str = "input model") -> Checkpoint | None:
        if reference in failed:
            return None
        try:
            location = locate(reference, folder, key)
            adapted = adapter_reference(reference, location, folder, key)
            if adapted is not None:  # mergekit's MODEL+LORA
                model, adapter = adapted
                opened_key = f"{Path(model).resolve()}+{Path(adapter).resolve()}"
                if opened_key not in opened:
                    opened[opened_key] = open_adapted(model, adapter)
                absolute = f"{os.path.abspath(model)}+{os.path.abspath(adapter)}"
                used = [(what, model), ("LoRA adapter", adapter)]
            else:
                resolved = Path(location).resolve() if Path(location).exists() else None
                opened_key = str(resolved) if resolved is not None else location
                if opened_key not in opened:
                    opened[opened_key] = open_checkpoint(location)
                absolute = os.path.abspath(location)
                used = [(what, location)]
        except ModelfuseError as exc:
            failed.add(reference)
            problems.add_error(exc)
            return None
        except OSError as exc:  # permission denied, an unreadable disk, ...
            failed.add(reference)
            problems.add(
                f"{key}: {short(reference)}: cannot be read ({exc.strerror or exc})",
                CheckpointError,
            )
            return None
        located[reference] = absolute
        inputs.extend(used)
        return opened[opened_key]

    def close_all() -> None:
        for ckpt in [*opened.values(), *patch_sources]:
            with contextlib.suppress(Exception):
                ckpt.close()

    try:
        compute = resolve_dtype(config.dtype)
        out_dtype = resolve_dtype(config.out_dtype, key="out_dtype")
        base_ckpt = None
        if config.base_model is not None:
            base_ckpt = get(config.base_model, "base_model")
        base_stats = None
        if config.base_statistics is not None:
            base_stats = _base_statistics(config, method, get, problems)
        entries: list[tuple[ModelEntry, Checkpoint | None, Checkpoint | None]] = []
        for number, piece in enumerate(config.slices or []):
            for i, src in enumerate(piece.sources):
                get(src.model, f"slices[{number}].sources[{i}].model")
            if piece.base_model is not None:
                get(piece.base_model, f"slices[{number}].base_model")
        for i, entry in enumerate(config.models or []):
            ckpt = get(entry.model, f"models[{i}].model")
            stats = None
            if entry.statistics is not None:
                stats = get(entry.statistics, f"models[{i}].statistics", "statistics file")
            entries.append((entry, ckpt, stats))
        for i, patch in enumerate(config.patches or []):
            try:
                location = locate(patch.patch, folder, f"patches[{i}].patch")
                patch_sources.append(PatchSource(location))
                located[patch.patch] = os.path.abspath(location)
                inputs.append(("patch", location))
            except ModelfuseError as exc:
                problems.add_error(exc)
        if not allow_crimes:
            crime = _mixed_architectures(opened, by_family=config.allow_prefix)
            if crime is not None:
                problems.add(crime, CheckpointError)
        if config_file is not None:
            inputs.append(("configuration file", config_file))
            inputs.append(("folder of the configuration", config_file.resolve().parent))
        if out is not None:
            problems.check(lambda: check_output_path(out, inputs, overwrite=overwrite))
        if method is not None:
            for i, (entry, ckpt, stats) in enumerate(entries):
                if stats is not None:
                    label = f"models[{i}].statistics {entry.statistics}"
                    for problem in _statistics_problems(method, label, stats, ckpt):
                        problems.add(problem)
            if base_stats is not None:
                label = f"base_statistics {config.base_statistics}"
                for problem in _statistics_problems(method, label, base_stats, base_ckpt):
                    problems.add(problem)
        for problem in check_vocabulary_keys(config, method):
            problems.add(problem)
        if method is None or failed or len(patch_sources) < len(config.patches or []):
            # Nothing more can be checked against the models: report what was found.
            if method is not None:
                for problem in parameter_key_problems(method, config):
                    problems.add(problem)
            problems.raise_now()
        step = None
        try:  # planning vocabularies left unaligned would only add noise: stop at a problem
            step = open_vocabulary(config, get, located, folder, base_ckpt, entries, locate)
        except ModelfuseError as exc:
            problems.add_error(exc)
            problems.raise_now()
        if step is not None and step.sources:  # plan with the checkpoints seen through it
            swap, open_one = step.source, get
            entries = [(e, swap(c) if c is not None else c, st) for e, c, st in entries]
            base_ckpt = swap(base_ckpt) if base_ckpt is not None else None

            def get(reference: str, key: str, what: str = "input model") -> Checkpoint | None:
                found = open_one(reference, key, what)
                return swap(found) if found is not None else None

        try:
            if config.slices is not None:
                plan = slice_plan(config, method, get, compute, out_dtype)
            else:
                plan = model_plan(
                    config, method, entries, base_ckpt, compute, out_dtype, notes, base_stats
                )
        except ModelfuseError as exc:
            problems.add_error(exc)
            problems.raise_now()
        with problems.collecting():
            attach_patches(
                plan,
                [
                    (entry.patch, source, entry.scale)
                    for entry, source in zip(config.patches or [], patch_sources)
                ],
            )
        problems.raise_all()
    except BaseException:
        close_all()
        raise
    if base_ckpt is not None:
        files_from = base_ckpt.folder
    else:
        first = plan.models[0].source
        files_from = getattr(first, "folder", None)
    return OpenedInputs(
        plan,
        config,
        [*opened.values(), *patch_sources],
        files_from,
        notes + plan.notes + (step.notes if step is not None else []),
        located,
        step,
    )


def _architecture(checkpoint: Checkpoint) -> str | None:
    """The architecture a model folder's config.json names (``architectures``, else ``model_type``)."""
    folder = getattr(checkpoint, "folder", None)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    names = data.get("architectures")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return short(", ".join(names))
    kind = data.get("model_type")
    return short(kind) if isinstance(kind, str) else None


_TASK_CLASS = re.compile(r"(?:For[A-Za-z]+|LMHeadModel|Model)$")


def _mixed_architectures(opened: Mapping[str, Checkpoint], *, by_family: bool = False) -> str | None:
    """A problem when the model folders name different architectures, as mergekit refuses.

    With ``by_family`` (``allow_prefix``), a backbone and task classes around it are one
    architecture: ``BertModel`` and ``BertForSequenceClassification`` are both ``Bert``.
    """
    found: dict[str, str] = {}
    families: set[str] = set()
    for location, checkpoint in opened.items():
        name = _architecture(checkpoint)
        if name is not None:
            found.setdefault(name, location)
            bare = name.strip("'\"")
            families.add(_TASK_CLASS.sub("", bare) or bare)
    if len(found) < 2 or (by_family and len(families) < 2):
        return None
    listed = "; ".join(f"{short(where)}: {name}" for name, where in found.items())
    return (
        f"the models name different architectures ({listed}); merging them is what mergekit "
        "calls a crime: pass --allow-crimes (allow_crimes=True) if you mean it"
    )
