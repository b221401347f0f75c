"""Planning a merge: what feeds each output tensor, with which parameters.

The plan is built from headers only (names, shapes, dtypes), before any tensor
is read. Every problem found (missing tensors, shape or dtype mismatches,
invalid parameter values) is collected and reported together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import ValidationError

from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.merge.parameters import evaluate_setting, format_validation_error
from modelfuse.merge.registry import MergeMethod

__all__ = [
    "MergePlan",
    "ModelInput",
    "TensorSource",
    "TensorTask",
    "build_plan",
    "layer_position",
]


class _Info(Protocol):
    shape: tuple[int, ...]
    dtype: torch.dtype


class TensorSource(Protocol):
    """What the planner needs of a checkpoint: names, headers, and reading one tensor."""

    def keys(self) -> list[str]: ...

    def __contains__(self, name: object) -> bool: ...

    def info(self, name: str) -> _Info: ...

    def read(self, name: str) -> torch.Tensor: ...


@dataclass
class ModelInput:
    """One input model: a label for messages, its tensors, settings and statistics."""

    label: str
    source: TensorSource
    parameters: Mapping[str, Any] = field(default_factory=dict)
    statistics: TensorSource | None = None


@dataclass(frozen=True)
class TensorTask:
    """The work for one output tensor."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    action: Literal["merge", "copy"]
    parameters: Mapping[str, Any]
    t: float

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.out_dtype.itemsize


@dataclass
class MergePlan:
    """Everything the engine needs; built by :func:`build_plan`."""

    method: MergeMethod
    models: list[ModelInput]
    base: ModelInput | None
    tasks: list[TensorTask]
    compute_dtype: torch.dtype | None
    notes: list[str] = field(default_factory=list)

    @property
    def reference(self) -> ModelInput:
        return self.base if self.base is not None else self.models[0]

    @property
    def total_bytes(self) -> int:
        return sum(task.nbytes for task in self.tasks)


_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_EMBEDDING = re.compile(r"embed|wte|wpe")


def layer_position(names: Sequence[str]) -> dict[str, float]:
    """The gradient position ``t`` of every tensor name, as mergekit computes it.

    The first numeric component of a name is its layer index ``i`` of ``n``
    layers (``n`` = the largest index + 1): ``t = i / (n - 1)``, or 1 when
    there is one layer. Names without a layer index get ``t = 0`` for
    embeddings and ``t = 1`` for everything else (final norm, output head).

    Examples
    --------
    >>> pos = layer_position(["model.embed_tokens.weight", "model.layers.0.w",
    ...                       "model.layers.2.w", "lm_head.weight"])
    >>> [pos[k] for k in ["model.embed_tokens.weight", "model.layers.0.w",
    ...                   "model.layers.2.w", "lm_head.weight"]]
    [0.0, 0.0, 1.0, 1.0]
    """
    index: dict[str, int | None] = {}
    for name in names:
        match = _LAYER.search(name)
        index[name] = int(match.group(1)) if match else None
    present = [i for i in index.values() if i is not None]
    n_layers = max(present) + 1 if present else 0
    positions: dict[str, float] = {}
    for name, i in index.items():
        if i is None:
            positions[name] = 0.0 if _EMBEDDING.search(name) else 1.0
        elif n_layers > 1:
            positions[name] = i / (n_layers - 1)
        else:
            positions[name] = 1.0
    return positions


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _resolve(
    method: MergeMethod,
    name: str,
    t: float,
    models: Sequence[ModelInput],
    global_settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Resolve and validate every parameter of ``method`` for tensor ``name``."""
    declaration = method.parameters
    resolved_global: dict[str, Any] = {}
    for key, setting in global_settings.items():
        value = evaluate_setting(setting, name, t)
        if value is not None:
            resolved_global[key] = value
    per_model = declaration.per_model_fields()
    per_model_values: dict[str, list[Any]] = {field_name: [] for field_name in per_model}
    validated = None
    for model in models:
        values = dict(resolved_global)
        for key, setting in model.parameters.items():
            value = evaluate_setting(setting, name, t)
            if value is not None:
                values[key] = value
        try:
            validated = declaration.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(exc, where=f"{model.label}: tensor {name}")
            ) from None
        for field_name in per_model:
            per_model_values[field_name].append(getattr(validated, field_name))
    if validated is None:  # no models: validate the global settings alone
        try:
            validated = declaration.model_validate(resolved_global)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, where=f"tensor {name}")) from None
    kwargs = {f: getattr(validated, f) for f in declaration.global_fields()}
    kwargs.update(per_model_values)
    return kwargs


def _check_keys(method: MergeMethod, where: str, settings: Mapping[str, Any]) -> list[str]:
    declaration = method.parameters
    problems = []
    for key in settings:
        if declaration.field_for(key) is None:
            valid = ", ".join(declaration.config_name(f) for f in declaration.model_fields)
            problems.append(
                f"{where}: unknown parameter {key!r} for merge method {method.name!r}; "
                f"valid parameters: {valid or 'none'}"
            )
    return problems


def build_plan(
    method: MergeMethod,
    models: Sequence[ModelInput],
    base: ModelInput | None,
    global_settings: Mapping[str, Any] | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> MergePlan:
    """Check the inputs against each other and resolve every tensor's parameters.

    Raises
    ------
    ConfigError
        Unknown or invalid parameters, or a model count the method does not take.
    CheckpointError
        Tensors missing from a model, or shape or dtype-kind mismatches; every
        problem is listed in the one message.
    """
    global_settings = dict(global_settings or {})
    problems: list[str] = []
    problems += _check_keys(method, "parameters", global_settings)
    for model in models:
        problems += _check_keys(method, f"{model.label}: parameters", model.parameters)
    if problems:
        raise ConfigError("; ".join(problems))
    if method.requires_base and base is None:
        raise ConfigError(
            f"merge method {method.name!r} needs a base model; set base_model to the "
            "pre-trained checkpoint the models were fine-tuned from"
        )
    if len(models) < method.min_models:
        raise ConfigError(
            f"merge method {method.name!r} needs at least {method.min_models} models "
            f"besides the base, got {len(models)}"
        )
    if method.max_models is not None and len(models) > method.max_models:
        raise ConfigError(
            f"merge method {method.name!r} takes at most {method.max_models} models "
            f"besides the base, got {len(models)}"
        )
    for kind in method.statistics:
        missing = [m.label for m in models if m.statistics is None]
        if missing:
            raise ConfigError(
                f"merge method {method.name!r} needs {kind} statistics for every model; "
                f"missing for {', '.join(missing)}: add `statistics: FILE` to each model entry "
                "(compute them with `modelfuse statistics`)"
            )
    if not method.statistics:
        given = [m.label for m in models if m.statistics is not None]
        if given:
            raise ConfigError(
                f"merge method {method.name!r} does not use statistics, but they are given for "
                f"{', '.join(given)}; remove `statistics:` or choose a data-aware method"
            )

    reference = base if base is not None else models[0]
    ref_names = reference.source.keys()
    others = ([base] if base is not None else []) + list(models)
    mismatches: list[str] = []
    ref_set = set(ref_names)
    for model in others:
        if model is reference:
            continue
        names = set(model.source.keys())
        missing = [n for n in ref_names if n not in names]
        extra = [n for n in model.source.keys() if n not in ref_set]
        for n in missing:
            mismatches.append(f"tensor {n} is in {reference.label} but missing from {model.label}")
        for n in extra:
            mismatches.append(f"tensor {n} is in {model.label} but missing from {reference.label}")
        for n in ref_names:
            if n not in names:
                continue
            a, b = reference.source.info(n), model.source.info(n)
            if tuple(a.shape) != tuple(b.shape):
                mismatches.append(
                    f"tensor {n} has shape {list(a.shape)} in {reference.label} "
                    f"but {list(b.shape)} in {model.label}"
                )
            elif _is_float(a.dtype) != _is_float(b.dtype):
                mismatches.append(
                    f"tensor {n} is {a.dtype} in {reference.label} but {b.dtype} in {model.label}"
                )
    if mismatches:
        shown = mismatches[:20]
        more = f"; and {len(mismatches) - 20} more" if len(mismatches) > 20 else ""
        raise CheckpointError(
            f"the models do not match ({len(mismatches)} problems): " + "; ".join(shown) + more
        )

    positions = layer_position(ref_names)
    tasks = []
    for name in ref_names:
        info = reference.source.info(name)
        shape = tuple(int(s) for s in info.shape)
        if not _is_float(info.dtype):
            tasks.append(TensorTask(name, shape, info.dtype, "copy", {}, positions[name]))
            continue
        t = positions[name]
        kwargs = _resolve(method, name, t, models, global_settings)
        dtype = out_dtype or compute_dtype or info.dtype
        tasks.append(TensorTask(name, shape, dtype, "merge", kwargs, t))
    return MergePlan(method, list(models), base, tasks, compute_dtype)
