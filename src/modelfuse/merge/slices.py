"""Planning a merge written with mergekit's ``slices:``: layer stacking and per-slice merges."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from modelfuse.merge.merge_method import MergeMethod
from modelfuse.merge.parameters import short
from modelfuse.merge.plan import (
    LAYER_INDEX,
    MergePlan,
    ModelInput,
    TensorTask,
    compare_inputs,
    is_float,
    plan_dtypes,
    stored_dtype,
)
from modelfuse.merge.plan_parameters import (
    ValueProblem,
    ValueProblems,
    check_keys,
    check_method,
    ignored_keys,
    raise_all,
    resolve_parameters,
    warn_ignored,
)

__all__ = ["OutputSlice", "SliceSource", "build_slice_plan", "count_layers", "split_layer_name"]


_EMBEDDING = re.compile(r"embed|wte|wpe")


@dataclass
class SliceSource:
    """One source of an output slice: a model and its layers ``[start, stop)``."""

    model: ModelInput
    layer_range: tuple[int, int]


@dataclass
class OutputSlice:
    """Output layers made from the same number of layers of each source."""

    sources: list[SliceSource]
    base: SliceSource | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


def split_layer_name(name: str) -> tuple[str, int] | None:
    """``"model.layers.3.mlp.w"`` -> ``("model.layers.{}.mlp.w", 3)``; None outside layers."""
    match = LAYER_INDEX.search(name)
    if match is None:
        return None
    start, stop = match.span(1)
    template = name[:start].replace("{", "{{").replace("}", "}}") + "{}"
    template += name[stop:].replace("{", "{{").replace("}", "}}")
    return template, int(match.group(1))


def count_layers(names: Sequence[str]) -> int:
    """The number of layers of a model: its largest layer index + 1 (0 without layers).

    Examples
    --------
    >>> count_layers(["embed.weight", "model.layers.0.w", "model.layers.11.w"])
    12
    """
    indices = [split[1] for split in map(split_layer_name, names) if split is not None]
    return max(indices) + 1 if indices else 0


def build_slice_plan(
    method: MergeMethod,
    slices: Sequence[OutputSlice],
    global_settings: Mapping[str, Any] | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
) -> MergePlan:
    """Plan a merge written with mergekit's ``slices:`` (layer stacking and per-slice merges).

    Output layers are numbered in order across the slices. Output layer ``k``
    of a slice is merged from layer ``start + k`` of each source (all sources
    of a slice span the same number of layers), with ``t = k / (n - 1)`` for
    gradients. Tensors outside the layers come from the first slice's sources
    when they are embeddings and from the last slice's otherwise, with the
    slice's parameters at ``t = 0`` (a gradient's first value), as in mergekit
    0.1.5.
    """
    global_settings = dict(global_settings or {})
    compute_dtype, out_dtype = plan_dtypes(compute_dtype, out_dtype)
    problems = check_keys(method, "parameters", global_settings)
    ignored = ignored_keys(method, "parameters", global_settings, model=False)
    for number, piece in enumerate(slices):
        where = f"slices[{number}].parameters"
        problems += check_keys(method, where, piece.parameters)
        ignored += ignored_keys(method, where, piece.parameters, model=False)
        for source in piece.sources:
            where = f"slices[{number}]: {source.model.label}: parameters"
            problems += check_keys(method, where, source.model.parameters)
            ignored += ignored_keys(method, where, source.model.parameters, model=True)
    values = ValueProblems()

    def participants(piece: OutputSlice) -> tuple[list[SliceSource], SliceSource | None]:
        if piece.base is None or not method.uses_base:
            return list(piece.sources), None
        others = [s for s in piece.sources if s is not piece.base]
        return others, piece.base

    mismatches: list[str] = []
    reference = slices[0].sources[0].model
    ref_names = reference.source.keys()
    # Layer templates of the reference: tensors of one layer (e.g. "model.layers.{}.mlp.w").
    templates: list[str] = []
    outside: list[str] = []
    for name in ref_names:
        split = split_layer_name(name)
        if split is None:
            outside.append(name)
        elif split[0] not in templates:
            templates.append(split[0])

    tasks: list[TensorTask] = []

    def add(
        name: str,
        t: float,
        sources: Sequence[tuple[ModelInput, str]],
        base: tuple[ModelInput, str] | None,
        levels: Sequence[Mapping[str, Any]],
        where: str,
    ) -> None:
        everyone = ([base] if base else []) + list(sources)
        for model, input_name in everyone:
            if input_name not in model.source:
                mismatches.append(f"{where}: tensor {input_name} is missing from {model.label}")
        if mismatches:
            return
        shape, _, _ = compare_inputs(name, everyone, mismatches)
        if mismatches:
            return
        first, first_name = everyone[0]
        info = first.source.info(first_name)
        if not is_float(info.dtype):
            tasks.append(TensorTask(name, shape, info.dtype, "copy", {}, t, (first,), (first_name,)))
            return
        models = [m for m, _ in sources]
        checked = check_method(method, models, base[0] if base else None, where)
        if checked:
            problems.extend(p for p in checked if p not in problems)
            return
        try:
            kwargs = resolve_parameters(method, name, t, models, *levels)
        except ValueProblem as exc:
            values.add(exc)
            return
        tasks.append(
            TensorTask(
                name,
                shape,
                out_dtype or compute_dtype or stored_dtype(info.dtype),
                "merge",
                kwargs,
                t,
                tuple(models),
                tuple(n for _, n in sources),
                base[0] if base else None,
                base[1] if base else None,
            )
        )

    def edge(piece: OutputSlice, number: int, names: list[str], t: float) -> None:
        others, base = participants(piece)
        for name in names:
            add(
                name,
                t,
                [(s.model, name) for s in others],
                (base.model, name) if base else None,
                [piece.parameters, global_settings],
                f"slices[{number}]",
            )

    embeddings = [n for n in outside if _EMBEDDING.search(n)]
    finals = [n for n in outside if not _EMBEDDING.search(n)]
    # Every range is checked against the model's real layers before anything iterates over it.
    counts: list[int | None] = []
    for number, piece in enumerate(slices):
        good = True
        for index, source in enumerate(piece.sources):
            start, stop = source.layer_range
            layers = count_layers(source.model.source.keys())
            if not 0 <= start < stop <= layers:
                problems.append(
                    f"slices[{number}].sources[{index}]: layer_range {short([start, stop])} "
                    f"is not within the model's {layers} layers; "
                    f"give [START, STOP) with 0 <= START < STOP <= {layers}"
                )
                good = False
        lengths = {s.layer_range[1] - s.layer_range[0] for s in piece.sources}
        if good and len(lengths) != 1:
            ranges = ", ".join(
                f"{s.model.label} {short(list(s.layer_range))}" for s in piece.sources
            )
            problems.append(
                f"slices[{number}]: every source must span the same positive number of layers; "
                f"got {ranges}"
            )
            good = False
        counts.append(lengths.pop() if good else None)
    if any(count is None for count in counts):
        raise_all(problems, mismatches, values)
    edge(slices[0], 0, embeddings, 0.0)
    layer = 0
    for number, piece in enumerate(slices):
        count = counts[number] or 0
        others, base = participants(piece)
        for k in range(count):
            t = k / (count - 1) if count > 1 else 1.0
            for template in templates:
                add(
                    template.format(layer),
                    t,
                    [(s.model, template.format(s.layer_range[0] + k)) for s in others],
                    (base.model, template.format(base.layer_range[0] + k)) if base else None,
                    [piece.parameters, global_settings],
                    f"slices[{number}]",
                )
            layer += 1
    edge(slices[-1], len(slices) - 1, finals, 0.0)
    raise_all(problems, mismatches, values)
    warn_ignored(ignored)
    models = list({id(s.model): s.model for piece in slices for s in piece.sources}.values())
    plan = MergePlan(method, models, None, tasks, compute_dtype)
    plan.layers = layer
    return plan
