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
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from modelfuse.checkpoint import Checkpoint, CheckpointWriter, open_checkpoint, parse_size
from modelfuse.errors import CheckpointError, ConfigError, ModelfuseError
from modelfuse.memory import peak_rss_bytes
from modelfuse.merge.config import MergeConfig, ModelEntry, load_config, resolve_dtype
from modelfuse.merge.execute import default_threads, execute_plan
from modelfuse.merge.output_paths import check_output_path, expand_user
from modelfuse.merge.parameters import IgnoredParameterWarning, format_error, short
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
    check_keys,
)
from modelfuse.merge.problems import Problems
from modelfuse.merge.registry import METHODS, MergeMethod, get_method

__all__ = [
    "DROPPED_CONFIG_KEYS",
    "MergeResult",
    "close_plan",
    "describe_plan",
    "merge",
    "plan_merge",
]


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


def _locate(reference: str, folder: Path, key: str = "model") -> str:
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
class _Opened:
    plan: MergePlan
    config: MergeConfig
    checkpoints: list[Checkpoint | PatchSource]
    files_from: Path | None
    notes: list[str]
    located: dict[str, str] = field(default_factory=dict)


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


def _open_all(
    config: MergeConfig,
    folder: Path,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    config_file: Path | None = None,
    allow_crimes: bool = False,
) -> _Opened:
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
            location = _locate(reference, folder, key)
            resolved = Path(location).resolve() if Path(location).exists() else None
            opened_key = str(resolved) if resolved is not None else location
            if opened_key not in opened:
                opened[opened_key] = open_checkpoint(location)
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
        located[reference] = os.path.abspath(location)
        inputs.append((what, location))
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
                location = _locate(patch.patch, folder, f"patches[{i}].patch")
                patch_sources.append(PatchSource(location))
                located[patch.patch] = os.path.abspath(location)
                inputs.append(("patch", location))
            except ModelfuseError as exc:
                problems.add_error(exc)
        if not allow_crimes:
            crime = _mixed_architectures(opened)
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
        if method is None or failed or len(patch_sources) < len(config.patches or []):
            # Nothing more can be checked against the models: report what was found.
            if method is not None:
                for problem in _parameter_key_problems(method, config):
                    problems.add(problem)
            problems.raise_now()
        try:
            if config.slices is not None:
                plan = _slice_plan(config, method, get, compute, out_dtype)
            else:
                plan = _model_plan(config, method, entries, base_ckpt, compute, out_dtype, notes)
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
    return _Opened(
        plan,
        config,
        [*opened.values(), *patch_sources],
        files_from,
        notes + plan.notes,
        located,
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


def _mixed_architectures(opened: Mapping[str, Checkpoint]) -> str | None:
    """A problem when the model folders name different architectures, as mergekit refuses."""
    found: dict[str, str] = {}
    for location, checkpoint in opened.items():
        name = _architecture(checkpoint)
        if name is not None:
            found.setdefault(name, location)
    if len(found) < 2:
        return None
    listed = "; ".join(f"{short(where)}: {name}" for name, where in found.items())
    return (
        f"the models name different architectures ({listed}); merging them is what mergekit "
        "calls a crime: pass --allow-crimes (allow_crimes=True) if you mean it"
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


def _parameter_key_problems(method: MergeMethod, config: MergeConfig) -> list[str]:
    """Unknown parameter names and out-of-range plain values, found without opening any model.

    A plain value (a number, not a gradient or filters) applies to every
    tensor, so it can be checked before the tensors are known; gradients and
    filters are checked per tensor when the models can be read.
    """
    levels: list[tuple[str, Mapping[str, Any], bool]] = [
        ("parameters", config.parameters or {}, False)
    ]
    levels += [(f"{e.model}: parameters", e.parameters or {}, True) for e in config.models or []]
    for number, piece in enumerate(config.slices or []):
        levels.append((f"slices[{number}].parameters", piece.parameters or {}, False))
        levels += [
            (f"slices[{number}]: {src.model}: parameters", src.parameters or {}, True)
            for src in piece.sources
        ]
    found: list[str] = []
    for where, settings, model in levels:
        found += check_keys(method, where, settings)
        found += _plain_value_problems(method, where, settings, model=model)
    return found


def _plain_value_problems(
    method: MergeMethod, where: str, settings: Mapping[str, Any], *, model: bool = False
) -> list[str]:
    """A problem for each plain (scalar) setting that ``method``'s declaration refuses.

    With ``model`` (one model's settings), global parameters are ignored, as
    the merge ignores them there.
    """
    declaration = method.parameters
    used = set(declaration.per_model_fields()) if model else set(declaration.model_fields)
    given = {
        key: value
        for key, value in settings.items()
        if declaration.field_for(key) in used and isinstance(value, (bool, int, float, str))
    }
    if not given:
        return []
    try:
        declaration.model_validate(given)
    except ValidationError as exc:
        keys = set(given) | {declaration.field_for(key) for key in given}
        return [
            f"{where}: {format_error(err)}"
            for err in exc.errors()
            if err["loc"] and str(err["loc"][0]) in keys
        ]
    return []


def _model_plan(
    config: MergeConfig,
    method: MergeMethod,
    entries: list[tuple[ModelEntry, Checkpoint | None, Checkpoint | None]],
    base_ckpt: Checkpoint | None,
    compute: torch.dtype | None,
    out_dtype: torch.dtype | None,
    notes: list[str],
) -> MergePlan:
    kept = list(entries)
    if base_ckpt is not None and method.uses_base:
        kept = [e for e in entries if e[1] is not base_ckpt]
        if len(kept) < len(entries):
            notes.append(
                f"{config.base_model} is both base_model and a model; it is used once, as the base"
            )
    models = [
        ModelInput(
            label=entry.model,
            source=ckpt,
            parameters=dict(entry.parameters or {}),
            statistics=stats,
        )
        for entry, ckpt, stats in kept
        if ckpt is not None
    ]
    if not models:
        raise ConfigError(
            "models: nothing to merge besides the base model; list at least one other model"
        )
    base = None
    if base_ckpt is not None and method.uses_base:
        base = ModelInput(label=config.base_model or "base", source=base_ckpt)
    return build_plan(
        method,
        models,
        base,
        config.parameters or {},
        compute_dtype=compute,
        out_dtype=out_dtype,
    )


def _slice_plan(
    config: MergeConfig,
    method: MergeMethod,
    get: Callable[..., Checkpoint | None],
    compute: torch.dtype | None,
    out_dtype: torch.dtype | None,
) -> MergePlan:
    slices = []
    for number, entry in enumerate(config.slices or []):
        sources = []
        for i, src in enumerate(entry.sources):
            ckpt = get(src.model, f"slices[{number}].sources[{i}].model")
            if ckpt is None:
                raise ConfigError(f"slices[{number}].sources[{i}]: {src.model} could not be opened")
            sources.append(
                SliceSource(
                    ModelInput(
                        label=f"{src.model} layers {src.layer_range[0]}-{src.layer_range[1] - 1}",
                        source=ckpt,
                        parameters=dict(src.parameters or {}),
                    ),
                    src.layer_range,
                )
            )
        base_ref = entry.base_model or config.base_model
        base = None
        if base_ref is not None and method.uses_base:
            base_ckpt = get(base_ref, f"slices[{number}].base_model")
            matches = [s for s in sources if s.model.source is base_ckpt]
            if not matches:
                raise ConfigError(
                    f"slices[{number}]: the base model {base_ref} is not among the slice's "
                    "sources; add it as a source with the layer range to use"
                )
            base = matches[0]
        slices.append(OutputSlice(sources, base, dict(entry.parameters or {})))
    plan = build_slice_plan(
        method, slices, config.parameters or {}, compute_dtype=compute, out_dtype=out_dtype
    )
    for number, entry in enumerate(config.slices or []):
        if entry.residual_weight is not None:
            warnings.warn(
                f"slices[{number}]: residual_weight is ignored: mergekit 0.1.5 accepts it and "
                "uses it nowhere; remove it",
                IgnoredParameterWarning,
                stacklevel=2,
            )
    return plan


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_VOCAB_ROWS = re.compile(r"embed_tokens\.weight$|wte\.weight$|word_embeddings\.weight$")


DROPPED_CONFIG_KEYS = (
    "_name_or_path",
    "_commit_hash",
    "_attn_implementation_autoset",
    "gradient_checkpointing",
)
"""Keys of an input's config.json that describe that input, not the merge: removed from OUT."""


def _written_dtype(plan: MergePlan) -> torch.dtype | None:
    """The dtype most merged tensors are written in (None when nothing is merged)."""
    counts: dict[torch.dtype, int] = {}
    for task in plan.tasks:
        if task.action == "merge":
            counts[task.out_dtype] = counts.get(task.out_dtype, 0) + task.nbytes
    return max(counts, key=lambda d: counts[d]) if counts else None


def _updated_model_config(files_from: Path | None, plan: MergePlan) -> tuple[str, list[str]] | None:
    """config.json for the output: its layer count, vocabulary size and dtype, no input's identity.

    ``torch_dtype`` (and ``dtype``, its newer name, when present) are set to
    the dtype the merged tensors are written in; the keys of
    :data:`DROPPED_CONFIG_KEYS` are removed. None when there is no
    config.json (or it is not a JSON object, which is then copied as it is).
    """
    if files_from is None or not (files_from / "config.json").is_file():
        return None
    try:
        data = json.loads((files_from / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    changes = []
    if plan.layers is not None:
        for key in _LAYER_KEYS:
            if key in data and data[key] != plan.layers:
                changes.append(f"{key} {short(data[key])} -> {plan.layers}")
                data[key] = plan.layers
    for task in plan.tasks:
        if task.shared_rows is not None and _VOCAB_ROWS.search(task.name):
            rows = task.shape[0]
            if "vocab_size" in data and data["vocab_size"] != rows:
                changes.append(f"vocab_size {short(data['vocab_size'])} -> {rows}")
                data["vocab_size"] = rows
    written = _written_dtype(plan)
    if written is not None:
        name = str(written).removeprefix("torch.")
        keys = [k for k in ("torch_dtype", "dtype") if k in data] or ["torch_dtype"]
        for key in keys:
            if data.get(key) != name:
                changes.append(f"{key} {short(data.get(key))} -> {name}")
                data[key] = name
    for key in DROPPED_CONFIG_KEYS:
        if key in data:
            del data[key]
            changes.append(f"{key} removed")
    return json.dumps(data, indent=2) + "\n", changes


def plan_merge(
    config: str | Path | dict[str, Any] | MergeConfig,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    allow_crimes: bool = False,
    random_seed: int | None = None,
) -> MergePlan:
    """Open the inputs and plan the merge without merging; every problem is raised together.

    Parameters
    ----------
    config : path, dict or MergeConfig
        As for :func:`merge`.
    out : path, optional
        The output folder: an existing one (without ``overwrite``) or one that
        is or holds an input is a problem too.
    overwrite, allow_crimes, random_seed
        As for :func:`merge`.

    Raises
    ------
    ConfigError, CheckpointError, OutputError
        One error listing every problem found (``"N problems:"`` and one line
        each when there are several).

    The checkpoints stay open through the returned plan's sources; close them
    with :func:`close_plan`.
    """
    cfg, folder = load_config(config)
    return _open_all(
        _with_seed(cfg, random_seed),
        folder,
        out=out,
        overwrite=overwrite,
        config_file=_config_file(config),
        allow_crimes=allow_crimes,
    ).plan


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


def _resolved_config(config: MergeConfig, located: dict[str, str]) -> dict[str, Any]:
    """The configuration with every model, statistics and patch path made absolute."""
    data = config.model_dump(mode="json", exclude_none=True)

    def fix(mapping: dict[str, Any], key: str) -> None:
        if isinstance(mapping.get(key), str) and mapping[key] in located:
            mapping[key] = located[mapping[key]]

    fix(data, "base_model")
    for entry in data.get("models", []):
        fix(entry, "model")
        fix(entry, "statistics")
    for piece in data.get("slices", []):
        fix(piece, "base_model")
        for source in piece.get("sources", []):
            fix(source, "model")
    for patch in data.get("patches", []):
        fix(patch, "patch")
    return data


def _resolved_yaml(config: MergeConfig, located: dict[str, str]) -> str:
    """modelfuse.yaml: a configuration that merges the same inputs again, from any folder."""
    from modelfuse import __version__

    header = (
        f"# modelfuse_version: {__version__}\n"
        "# The configuration of this merge, with absolute paths: "
        "`modelfuse merge modelfuse.yaml OUT` merges it again.\n"
    )
    return header + yaml.safe_dump(_resolved_config(config, located), sort_keys=False)


def _model_card(config: MergeConfig, plan: MergePlan, located: dict[str, str]) -> str:
    """README.md: the method, the inputs, the parameters and the modelfuse version."""
    from modelfuse import __version__

    data = _resolved_config(config, located)
    method = plan.method
    lines = [
        "---",
        "tags:",
        "- merge",
        "- modelfuse",
        "---",
        "",
        "# Merged model",
        "",
        f"This model was merged with modelfuse {__version__} using the `{method.name}` method "
        f"({method.summary}).",
        "",
        "## Inputs",
        "",
    ]
    if "base_model" in data:
        lines.append(f"- base model: `{data['base_model']}`")
    for entry in data.get("models", []):
        extra = f" (statistics `{entry['statistics']}`)" if "statistics" in entry else ""
        lines.append(f"- model: `{entry['model']}`{extra}")
    for number, piece in enumerate(data.get("slices", [])):
        for source in piece["sources"]:
            lines.append(
                f"- slice {number}: `{source['model']}` layers "
                f"{source['layer_range'][0]}-{source['layer_range'][1] - 1}"
            )
    for patch in data.get("patches", []):
        lines.append(f"- patch: `{patch['patch']}` scaled by {patch['scale']}")
    lines += ["", "## Parameters", ""]
    settings = {
        key: value
        for key, value in data.items()
        if key in ("parameters", "dtype", "out_dtype", "tokenizer_source")
    }
    per_model = [e for e in data.get("models", []) if "parameters" in e]
    if not settings and not per_model:
        lines.append("The method's defaults (see `modelfuse methods " + method.name + "`).")
    else:
        if settings:
            lines += ["```yaml", yaml.safe_dump(settings, sort_keys=False).rstrip(), "```"]
        for entry in per_model:
            lines.append(f"- `{entry['model']}`: {json.dumps(entry['parameters'])}")
    lines += [
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(data, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


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
    cfg = _with_seed(cfg, random_seed)
    budget = parse_size(shard_size)
    workers = default_threads() if threads is None else int(threads)
    if workers < 1:
        raise ConfigError(f"threads: expected a positive number, got {threads}")
    opened = _open_all(
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
            updated = _updated_model_config(opened.files_from, plan)
            if updated is not None:
                writer.add_file("config.json", updated[0])
                if updated[1]:  # say what changed, if anything did
                    notes.append(f"config.json: {', '.join(updated[1])}")
            if opened.files_from is not None:
                copied = writer.copy_model_files(opened.files_from, tokenizer=copy_tokenizer)
                if copied:
                    notes.append(f"copied {', '.join(copied)} from {opened.files_from}")
            writer.add_file("modelfuse.yaml", _resolved_yaml(cfg, opened.located))
            if model_card:
                writer.add_file("README.md", _model_card(cfg, plan, opened.located))
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
