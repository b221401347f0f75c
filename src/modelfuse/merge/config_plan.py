"""The plan of a configuration: its models (or slices) as plan inputs, and the problems
found in its parameters before any model is read."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import ValidationError

from modelfuse.checkpoint import Checkpoint
from modelfuse.errors import ConfigError
from modelfuse.merge.config import MergeConfig, ModelEntry
from modelfuse.merge.merge_method import MergeMethod
from modelfuse.merge.name_matching import RenamedSource, find_prefix
from modelfuse.merge.parameters import IgnoredParameterWarning, format_error
from modelfuse.merge.plan import MergePlan, ModelInput, build_plan
from modelfuse.merge.plan_parameters import check_keys
from modelfuse.merge.slices import OutputSlice, SliceSource, build_slice_plan

__all__ = ["model_plan", "parameter_key_problems", "slice_plan"]


def parameter_key_problems(method: MergeMethod, config: MergeConfig) -> list[str]:
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


def model_plan(
    config: MergeConfig,
    method: MergeMethod,
    entries: list[tuple[ModelEntry, Checkpoint | None, Checkpoint | None]],
    base_ckpt: Checkpoint | None,
    compute: torch.dtype | None,
    out_dtype: torch.dtype | None,
    notes: list[str],
    base_statistics: Checkpoint | None = None,
) -> MergePlan:
    kept = list(entries)
    if base_ckpt is not None and method.uses_base:
        kept = [e for e in entries if e[1] is not base_ckpt]
        if len(kept) < len(entries):
            notes.append(
                f"{config.base_model} is both base_model and a model; it is used once, as the base"
            )
        for entry, ckpt, _ in entries:
            if ckpt is base_ckpt and entry.parameters:
                _check_base_entry(method, entry)
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
        base = ModelInput(
            label=config.base_model or "base", source=base_ckpt, statistics=base_statistics
        )
    # A base the method does not merge (fisher, regmean) still names the backbone when
    # heads are kept or dropped: the tensors outside it are each model's head.
    namer = base
    if base is None and base_ckpt is not None and config.heads is not None:
        namer = ModelInput(label=config.base_model or "base", source=base_ckpt)
    if config.allow_prefix:
        match_prefixes(models, namer, notes)
    return build_plan(
        method,
        models,
        base,
        config.parameters or {},
        compute_dtype=compute,
        out_dtype=out_dtype,
        heads=config.heads,
        backbone=None if namer is None or namer is base else set(namer.source.keys()),
    )


def match_prefixes(models: list[ModelInput], base: ModelInput | None, notes: list[str]) -> None:
    """Show every model (and its statistics) under the reference's tensor names, where a
    prefix makes them match (``allow_prefix``); one note per renamed model."""
    reference = base if base is not None else models[0]
    names = list(reference.source.keys())
    for model in models:
        if model is reference:
            continue
        found = find_prefix(names, list(model.source.keys()))
        if not found:
            continue
        model.source = RenamedSource(model.source, found)
        if model.statistics is not None:
            model.statistics = RenamedSource(model.statistics, found)
        notes.append(f"{model.label}: {found.describe()} ({reference.label}); matched by prefix")


def _check_base_entry(method: MergeMethod, entry: ModelEntry) -> None:
    """Refuse unknown or invalid parameters under the base's model entry; warn that valid ones
    are ignored (the base takes no per-model parameters, in mergekit 0.1.5 as here)."""
    where = f"{entry.model}: parameters"
    settings = entry.parameters or {}
    problems = check_keys(method, where, settings)
    problems += _plain_value_problems(method, where, settings, model=True)
    if problems:
        raise ConfigError("; ".join(problems))
    keys = ", ".join(repr(str(key))[:40] for key in settings)
    warnings.warn(
        f"{where}: {keys} ignored: {entry.model} is the base model, which takes no per-model "
        "parameters (mergekit 0.1.5 ignores them too); remove them from its entry",
        IgnoredParameterWarning,
        stacklevel=2,
    )


def slice_plan(
    config: MergeConfig,
    method: MergeMethod,
    get: Callable[..., Checkpoint | None],
    compute: torch.dtype | None,
    out_dtype: torch.dtype | None,
) -> MergePlan:
    if config.allow_prefix or config.heads is not None:
        key = "allow_prefix" if config.allow_prefix else "heads"
        raise ConfigError(
            f"{key}: works with models:, not with slices: (a slice names each source's "
            "layers itself); list the models under models:, or remove it"
        )
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
