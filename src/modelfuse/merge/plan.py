"""Planning a merge: what feeds each output tensor, with which parameters.

The plan is built from headers only (names, shapes, dtypes), before any tensor
is read. Every problem found (missing tensors, shape or dtype mismatches,
invalid parameter values) is collected and reported together.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from modelfuse.merge.merge_method import MergeMethod
from modelfuse.merge.name_matching import is_buffer
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

__all__ = [
    "LAYER_INDEX",
    "MergePlan",
    "ModelInput",
    "TensorSource",
    "TensorTask",
    "build_plan",
    "compare_inputs",
    "is_float",
    "layer_position",
    "plan_dtypes",
    "stored_dtype",
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
    """The work for one output tensor.

    ``models[i]`` provides its tensor ``inputs[i]``; ``base`` provides
    ``base_input``. For a ``copy`` the first input is copied as it is. When the
    inputs' first dimensions differ (a fine-tune that added tokens),
    ``shared_rows`` rows are merged and the remaining rows are taken from
    ``models[extra_from]``.
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    action: Literal["merge", "copy"]
    parameters: Mapping[str, Any]
    t: float
    models: tuple[ModelInput, ...] = ()
    inputs: tuple[str, ...] = ()
    base: ModelInput | None = None
    base_input: str | None = None
    shared_rows: int | None = None
    extra_from: int | None = None
    patches: tuple[tuple[TensorSource, float], ...] = ()

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
    layers: int | None = None  # the output's layer count when slices renumber layers
    # ``heads: keep``: per model, the tensors only it has (its task head), written beside
    heads: list[tuple[ModelInput, list[str]]] = field(default_factory=list)

    @property
    def reference(self) -> ModelInput:
        return self.base if self.base is not None else self.models[0]

    @property
    def total_bytes(self) -> int:
        return sum(task.nbytes for task in self.tasks)


LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_position(names: Sequence[str]) -> dict[str, float]:
    """The gradient position ``t`` of every tensor name, as mergekit 0.1.5 computes it.

    The first numeric component of a name is its layer index ``i`` of ``n``
    layers (``n`` = the largest index + 1): ``t = i / (n - 1)``, or 1 when
    there is one layer. Names without a layer index (embeddings, final norm,
    output head alike) get ``t = 0``: mergekit's planner reads the settings of
    every tensor outside the layers at ``t = 0``, so a gradient gives them its
    first value.

    Examples
    --------
    >>> pos = layer_position(["model.embed_tokens.weight", "model.layers.0.w",
    ...                       "model.layers.2.w", "lm_head.weight"])
    >>> [pos[k] for k in ["model.embed_tokens.weight", "model.layers.0.w",
    ...                   "model.layers.2.w", "lm_head.weight"]]
    [0.0, 0.0, 1.0, 0.0]
    """
    index: dict[str, int | None] = {}
    for name in names:
        match = LAYER_INDEX.search(name)
        index[name] = int(match.group(1)) if match else None
    present = [i for i in index.values() if i is not None]
    n_layers = max(present) + 1 if present else 0
    positions: dict[str, float] = {}
    for name, i in index.items():
        if i is None:
            positions[name] = 0.0
        elif n_layers > 1:
            positions[name] = i / (n_layers - 1)
        else:
            positions[name] = 1.0
    return positions


def plan_dtypes(
    compute_dtype: torch.dtype | None, out_dtype: torch.dtype | None
) -> tuple[torch.dtype | None, torch.dtype | None]:
    """``(compute, out)``: ``dtype: float64`` rounds no input, so inputs are read as they are.

    The arithmetic is float32 whatever the compute dtype; float64 only decides
    the written dtype (unless ``out_dtype`` is given), without holding float64
    copies of the inputs.
    """
    if compute_dtype == torch.float64:
        return None, out_dtype or torch.float64
    return compute_dtype, out_dtype


def stored_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a merged tensor is written in without ``dtype``: float8 inputs give float32."""
    return torch.float32 if dtype.itemsize == 1 else dtype


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


_GROWABLE = re.compile(r"embed|lm_head|wte|(?:^|\.)output\.weight$|word_embeddings")


def compare_inputs(
    name: str,
    inputs: Sequence[tuple[ModelInput, str]],
    mismatches: list[str],
) -> tuple[tuple[int, ...], int | None, int | None]:
    """Check one output tensor's inputs; return (shape, shared_rows, extra_from)."""
    (ref, ref_name), *others = inputs
    a = ref.source.info(ref_name)
    shape = tuple(int(x) for x in a.shape)
    rows = [shape[0]] if shape else []
    ok = True
    for model, input_name in others:
        b = model.source.info(input_name)
        other = tuple(int(x) for x in b.shape)
        where = name if input_name == name else f"{name} (from {input_name})"
        if is_float(a.dtype) != is_float(b.dtype):
            mismatches.append(
                f"tensor {where} is {a.dtype} in {ref.label} but {b.dtype} in {model.label}"
            )
            ok = False
        elif other != shape:
            same_tail = len(other) == len(shape) and other[1:] == shape[1:] and len(shape) >= 1
            if same_tail and _GROWABLE.search(name) and is_float(a.dtype):
                rows.append(other[0])
                continue
            mismatches.append(
                f"tensor {where} has shape {list(shape)} in {ref.label} "
                f"but {list(other)} in {model.label}"
            )
            ok = False
    if not ok or len(set(rows)) <= 1:
        return shape, None, None
    largest = max(rows)
    return (largest, *shape[1:]), min(rows), rows.index(largest)


def build_plan(
    method: MergeMethod,
    models: Sequence[ModelInput],
    base: ModelInput | None,
    global_settings: Mapping[str, Any] | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    heads: Literal["keep", "drop"] | None = None,
    backbone: Collection[str] | None = None,
) -> MergePlan:
    """Check the inputs against each other and resolve every tensor's parameters.

    Every tensor of the reference model (the base, else the first model) is
    merged from the tensors of the same name in every model. Embedding-like
    tensors (``embed``, ``lm_head``, ``wte``, ``word_embeddings``) whose first
    dimension differs between models (a fine-tune that added tokens) are
    merged on their shared rows; the extra rows are kept from the model that
    has the most, and the plan's notes say so. Buffers (integer tensors such as
    ``position_ids``, caches such as ``inv_freq``; see
    :func:`~modelfuse.merge.name_matching.is_buffer`) that only some inputs
    store are copied from the base, else the first model that has one. The
    tensors only a model has (a task head) are an error unless ``heads`` is
    ``"keep"`` (listed in the plan's ``heads``, written beside the merge) or
    ``"drop"``. ``backbone`` (the names of a base model that the method does
    not merge, such as Fisher's or RegMean's) marks every other name of every
    model, the first one's included, as its head.

    Raises
    ------
    ConfigError
        Unknown or invalid parameters, or a model count the method does not take.
    CheckpointError
        Tensors missing from a model, or shape or dtype-kind mismatches; every
        problem is listed in the one message.
    """
    global_settings = dict(global_settings or {})
    compute_dtype, out_dtype = plan_dtypes(compute_dtype, out_dtype)
    problems: list[str] = []
    problems += check_keys(method, "parameters", global_settings)
    ignored = ignored_keys(method, "parameters", global_settings, model=False)
    for model in models:
        problems += check_keys(method, f"{model.label}: parameters", model.parameters)
        ignored += ignored_keys(method, f"{model.label}: parameters", model.parameters, model=True)
    problems += check_method(method, models, base)
    values = ValueProblems()

    reference = base if base is not None else models[0]
    everyone = ([base] if base is not None else []) + list(models)
    mismatches: list[str] = []
    notes: list[str] = []
    carried = carried_buffers(everyone, notes)
    ref_names = list(reference.source.keys())
    if backbone is not None and heads is not None:
        ref_names = [n for n in ref_names if n in backbone]
    ref_names += [n for n in carried if n not in reference.source]
    ref_set = set(ref_names)
    head_names: dict[int, list[str]] = {}
    for number, model in enumerate(everyone):
        if model is not reference:
            names = set(model.source.keys())
            for n in ref_names:
                if n not in names and n not in carried:
                    mismatches.append(
                        f"tensor {n} is in {reference.label} but missing from {model.label}"
                    )
        for n in model.source.keys():
            if n in ref_set:
                continue
            if heads is not None and model is not base:
                head_names.setdefault(number, []).append(n)
            else:
                hint = " (a task head? set heads: keep or heads: drop)" if heads is None else ""
                mismatches.append(
                    f"tensor {n} is in {model.label} but missing from {reference.label}{hint}"
                )
    kept_heads = [(everyone[i], names) for i, names in head_names.items()]
    notes += [
        f"{model.label}: {len(names)} tensors of its own (its head: {_listed(names)}) "
        + ("not merged, kept per model (heads: keep)" if heads == "keep" else "dropped (heads: drop)")
        for model, names in kept_heads
    ]
    positions = layer_position(ref_names)
    tasks = []
    for name in ref_names:
        if name in carried:
            owner = carried[name]
            info = owner.source.info(name)
            shape = tuple(int(x) for x in info.shape)
            tasks.append(TensorTask(name, shape, info.dtype, "copy", {}, 0.0, (owner,), (name,)))
            continue
        if not all(name in m.source for m in everyone):
            continue  # reported above
        shape, shared, extra = compare_inputs(name, [(m, name) for m in everyone], mismatches)
        if mismatches:
            continue
        info = reference.source.info(name)
        t = positions[name]
        if not is_float(info.dtype):
            tasks.append(
                TensorTask(name, shape, info.dtype, "copy", {}, t, (reference,), (name,))
            )
            continue
        try:
            kwargs = resolve_parameters(method, name, t, models, global_settings)
        except ValueProblem as exc:
            values.add(exc)
            continue
        dtype = out_dtype or compute_dtype or stored_dtype(info.dtype)
        extra_from = None
        if shared is not None and extra is not None:
            # ``extra`` indexes ``everyone``; the base (if any) comes first there.
            offset = 1 if base is not None else 0
            extra_from = extra - offset  # -1 means the base
            owner = base if extra_from < 0 else models[extra_from]
            notes.append(
                f"tensor {name}: the models have different numbers of rows; the {shared} shared "
                f"rows are merged and rows {shared}-{shape[0] - 1} are kept from {owner.label}"
            )
        tasks.append(
            TensorTask(
                name,
                shape,
                dtype,
                "merge",
                kwargs,
                t,
                tuple(models),
                tuple(name for _ in models),
                base,
                name if base is not None else None,
                shared,
                extra_from,
            )
        )
    raise_all(problems, mismatches, values)
    warn_ignored(ignored)
    plan = MergePlan(method, list(models), base, tasks, compute_dtype, notes)
    if heads == "keep":
        plan.heads = kept_heads
    return plan


def carried_buffers(everyone: Sequence[ModelInput], notes: list[str]) -> dict[str, ModelInput]:
    """Buffers that some inputs store and others do not, each with the input it is copied
    from (the base, which comes first, else the first model that has it); one note says so.
    A float tensor that is not a known buffer is never carried (its absence is an error)."""
    present: dict[str, list[ModelInput]] = {}
    for model in everyone:
        for name in model.source.keys():
            present.setdefault(name, []).append(model)
    carried: dict[str, ModelInput] = {}
    for name, holders in present.items():
        if len(holders) == len(everyone):
            continue
        if all(is_buffer(name, m.source.info(name).dtype) for m in holders):
            carried[name] = holders[0]
    if carried:
        by_owner: dict[str, list[str]] = {}
        for name, owner in carried.items():
            by_owner.setdefault(owner.label, []).append(name)
        notes.append(
            "buffers that not every model stores, carried over: "
            + "; ".join(f"{_listed(names)} from {label}" for label, names in by_owner.items())
        )
    return carried


def _listed(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
