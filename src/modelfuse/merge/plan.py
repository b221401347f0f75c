"""Planning a merge: what feeds each output tensor, with which parameters.

The plan is built from headers only (names, shapes, dtypes), before any tensor
is read. Every problem found (missing tensors, shape or dtype mismatches,
invalid parameter values) is collected and reported together.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
from pydantic import ValidationError

from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.merge.parameters import (
    MERGEKIT_METHODS,
    MERGEKIT_PARAMETERS,
    IgnoredParameterWarning,
    MethodParameters,
    evaluate_setting,
    format_error,
    format_validation_error,
    short,
)
from modelfuse.merge.problems import Problems
from modelfuse.merge.registry import MergeMethod

__all__ = [
    "MergePlan",
    "ModelInput",
    "OutputSlice",
    "SliceSource",
    "TensorSource",
    "TensorTask",
    "build_plan",
    "build_slice_plan",
    "attach_patches",
    "check_keys",
    "count_layers",
    "ignored_keys",
    "layer_position",
    "split_layer_name",
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

    @property
    def reference(self) -> ModelInput:
        return self.base if self.base is not None else self.models[0]

    @property
    def total_bytes(self) -> int:
        return sum(task.nbytes for task in self.tasks)


_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_EMBEDDING = re.compile(r"embed|wte|wpe")


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
        match = _LAYER.search(name)
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


def _dtypes(
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


def _stored_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a merged tensor is written in without ``dtype``: float8 inputs give float32."""
    return torch.float32 if dtype.itemsize == 1 else dtype


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


class _ValueProblem(ConfigError):
    """Invalid parameter values for one tensor; ``texts`` say them without the tensor's name.

    Each text is ``"WHERE\\0WHAT"``: the model (empty for a global parameter) and the problem.
    """

    def __init__(self, message: str, texts: list[str], tensor: str) -> None:
        super().__init__(message)
        self.texts = texts
        self.tensor = tensor


class _ValueProblems:
    """Invalid parameter values, grouped: one line per problem naming the first tensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, list[str]] = {}

    def add(self, problem: _ValueProblem) -> None:
        for text in problem.texts:
            self.tensors.setdefault(text, []).append(problem.tensor)

    def lines(self) -> list[str]:
        out = []
        for text, tensors in self.tensors.items():
            where, _, body = text.partition("\0")
            more = f" (and {len(tensors) - 1} more tensors)" if len(tensors) > 1 else ""
            out.append(f"{where}tensor {tensors[0]}{more}: {body}")
        return out


def _value_texts(
    exc: ValidationError, declaration: type[MethodParameters], model: ModelInput | None
) -> list[str]:
    """One text per failing parameter, naming the model only when the model set the value."""
    per_model = set(declaration.per_model_fields())
    own = set() if model is None else {declaration.field_for(k) for k in model.parameters}
    own &= per_model
    texts = []
    for error in exc.errors():
        field_name = declaration.field_for(str(error["loc"][0])) if error["loc"] else None
        where = f"{model.label}: " if model is not None and field_name in own else ""
        texts.append(where + "\0" + format_error(error))
    return texts


def _resolve(
    method: MergeMethod,
    name: str,
    t: float,
    models: Sequence[ModelInput],
    *levels: Mapping[str, Any],
) -> dict[str, Any]:
    """Resolve and validate every parameter of ``method`` for tensor ``name``.

    A model's own settings of per-model parameters win, then ``levels`` from
    the most specific (a slice's) to the least (the global ``parameters``); a
    setting whose filters match nothing falls through to the next level, as in
    mergekit. A model's settings of global parameters are ignored (mergekit
    reads global parameters with no model; :func:`ignored_keys` warns), so the
    result never depends on the order of the models.
    """
    declaration = method.parameters
    resolved_global: dict[str, Any] = {}
    for settings in reversed(levels):
        for key, setting in settings.items():
            if declaration.field_for(key) is None:
                continue  # reported by check_keys
            value = evaluate_setting(setting, name, t)
            if value is not None:
                resolved_global[key] = value
    per_model = declaration.per_model_fields()
    per_model_values: dict[str, list[Any]] = {field_name: [] for field_name in per_model}
    validated = None
    failures: list[str] = []
    first: str | None = None
    for model in models:
        values = dict(resolved_global)
        for key, setting in model.parameters.items():
            if declaration.field_for(key) not in per_model:
                continue  # unknown: reported by check_keys; global: ignored (ignored_keys)
            value = evaluate_setting(setting, name, t)
            if value is not None:
                values[key] = value
        try:
            validated = declaration.model_validate(values)
        except ValidationError as exc:
            first = first or format_validation_error(exc, where=f"{model.label}: tensor {name}")
            failures += [t for t in _value_texts(exc, declaration, model) if t not in failures]
            continue
        for field_name in per_model:
            per_model_values[field_name].append(getattr(validated, field_name))
    if failures:
        raise _ValueProblem(first or name, failures, name)
    if validated is None:  # no models: validate the global settings alone
        try:
            validated = declaration.model_validate(resolved_global)
        except ValidationError as exc:
            raise _ValueProblem(
                format_validation_error(exc, where=f"tensor {name}"),
                _value_texts(exc, declaration, None),
                name,
            ) from None
    kwargs = {f: getattr(validated, f) for f in declaration.global_fields()}
    kwargs.update(per_model_values)
    return kwargs


def _mergekit_ignores(method: MergeMethod, key: str) -> bool:
    """Whether mergekit 0.1.5 runs ``method`` with ``key`` and ignores it (see MERGEKIT_PARAMETERS)."""
    return (
        method.name in MERGEKIT_METHODS
        and key in MERGEKIT_PARAMETERS
        and method.parameters.field_for(key) is None
    )


def _valid_names(method: MergeMethod) -> str:
    declaration = method.parameters
    return ", ".join(declaration.config_name(f) for f in declaration.model_fields) or "none"


def check_keys(method: MergeMethod, where: str, settings: Mapping[str, Any]) -> list[str]:
    """A problem for every key of ``settings`` that ``method`` does not have.

    Names that mergekit 0.1.5 accepts and ignores for this method are not
    problems (:func:`ignored_keys` warns about them instead).
    """
    declaration = method.parameters
    problems = []
    for key in settings:
        if declaration.field_for(key) is None and not _mergekit_ignores(method, key):
            problems.append(
                f"{where}: unknown parameter {short(key)} for merge method {method.name!r}; "
                f"valid parameters: {_valid_names(method)}"
            )
    return problems


def ignored_keys(
    method: MergeMethod, where: str, settings: Mapping[str, Any], *, model: bool
) -> list[str]:
    """One message for every key of ``settings`` that the merge ignores, as mergekit 0.1.5 does.

    Ignored are a parameter name of another mergekit method on a mergekit
    method without it (``weight`` on ``model_stock``, ``density`` on
    ``task_arithmetic``), and, when ``model`` is true (the settings are one
    model's), a global parameter: mergekit reads global parameters only from
    the top-level ``parameters`` and a slice's, never from a model's.

    Examples
    --------
    >>> from modelfuse.merge.registry import get_method
    >>> ignored_keys(get_method("slerp"), "models[0]", {"weight": 1.0}, model=True)[0][:52]
    "models[0]: 'weight' is ignored: merge method 'slerp'"
    """
    declaration = method.parameters
    per_model = set(declaration.per_model_fields())
    found = []
    for key in settings:
        field_name = declaration.field_for(key)
        if _mergekit_ignores(method, key):
            found.append(
                f"{where}: {short(key)} is ignored: merge method {method.name!r} has no such "
                f"parameter, and mergekit 0.1.5 ignores it too; remove it (parameters of "
                f"{method.name!r}: {_valid_names(method)})"
            )
        elif model and field_name is not None and field_name not in per_model:
            found.append(
                f"{where}: {short(key)} is ignored: it is a global parameter of merge method "
                f"{method.name!r}, and mergekit 0.1.5 reads those only from the top-level (or "
                "a slice's) parameters; move it there"
            )
    return found


def _warn_ignored(messages: Sequence[str]) -> None:
    for message in dict.fromkeys(messages):
        warnings.warn(message, IgnoredParameterWarning, stacklevel=3)


def _check_method(
    method: MergeMethod,
    models: Sequence[ModelInput],
    base: ModelInput | None,
    where: str = "",
) -> list[str]:
    """What is wrong with the number of models, the base and the statistics for ``method``."""
    prefix = f"{where}: " if where else ""
    problems = []
    if method.requires_base and base is None:
        problems.append(
            f"{prefix}merge method {method.name!r} needs a base model; set base_model to the "
            "pre-trained checkpoint the models were fine-tuned from"
        )
    if len(models) < method.min_models:
        problems.append(
            f"{prefix}merge method {method.name!r} needs at least {method.min_models} models "
            f"besides the base, got {len(models)}"
        )
    if method.max_models is not None and len(models) > method.max_models:
        problems.append(
            f"{prefix}merge method {method.name!r} takes at most {method.max_models} models "
            f"besides the base, got {len(models)}"
        )
    given = len(models) + (1 if base is not None else 0)
    if method.points is not None and given != method.points and not problems:
        problems.append(
            f"{prefix}merge method {method.name!r} takes exactly {method.points} models, "
            f"the base_model counted; got {len(models)}"
            + (" and a base_model" if base is not None else " and no base_model")
        )
    for kind in method.statistics:
        missing = [m.label for m in models if m.statistics is None]
        if missing:
            problems.append(
                f"merge method {method.name!r} needs {kind} statistics for every model; "
                f"missing for {', '.join(missing)}: add `statistics: FILE` to each model entry "
                "(compute them with `modelfuse statistics`)"
            )
    if not method.statistics:
        given = [m.label for m in models if m.statistics is not None]
        if given:
            problems.append(
                f"merge method {method.name!r} does not use statistics, but they are given for "
                f"{', '.join(given)}; remove `statistics:` or choose a data-aware method"
            )
    return problems


def _raise_all(problems: list[str], mismatches: list[str], values: _ValueProblems) -> None:
    """One error listing every problem: configuration problems, then the models' mismatches."""
    collected = Problems()
    for problem in problems:
        collected.add(problem, ConfigError)
    for line in values.lines():
        collected.add(line, ConfigError)
    if mismatches:
        shown = mismatches[:20]
        more = f"; and {len(mismatches) - 20} more" if len(mismatches) > 20 else ""
        collected.add(
            f"the models do not match ({len(mismatches)} problems): " + "; ".join(shown) + more,
            CheckpointError,
        )
    collected.raise_all()


_GROWABLE = re.compile(r"embed|lm_head|wte|(?:^|\.)output\.weight$|word_embeddings")


def _compare(
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
        if _is_float(a.dtype) != _is_float(b.dtype):
            mismatches.append(
                f"tensor {where} is {a.dtype} in {ref.label} but {b.dtype} in {model.label}"
            )
            ok = False
        elif other != shape:
            same_tail = len(other) == len(shape) and other[1:] == shape[1:] and len(shape) >= 1
            if same_tail and _GROWABLE.search(name) and _is_float(a.dtype):
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
) -> MergePlan:
    """Check the inputs against each other and resolve every tensor's parameters.

    Every tensor of the reference model (the base, else the first model) is
    merged from the tensors of the same name in every model. Embedding-like
    tensors (``embed``, ``lm_head``, ``wte``, ``word_embeddings``) whose first
    dimension differs between models (a fine-tune that added tokens) are
    merged on their shared rows; the extra rows are kept from the model that
    has the most, and the plan's notes say so.

    Raises
    ------
    ConfigError
        Unknown or invalid parameters, or a model count the method does not take.
    CheckpointError
        Tensors missing from a model, or shape or dtype-kind mismatches; every
        problem is listed in the one message.
    """
    global_settings = dict(global_settings or {})
    compute_dtype, out_dtype = _dtypes(compute_dtype, out_dtype)
    problems: list[str] = []
    problems += check_keys(method, "parameters", global_settings)
    ignored = ignored_keys(method, "parameters", global_settings, model=False)
    for model in models:
        problems += check_keys(method, f"{model.label}: parameters", model.parameters)
        ignored += ignored_keys(method, f"{model.label}: parameters", model.parameters, model=True)
    problems += _check_method(method, models, base)
    values = _ValueProblems()

    reference = base if base is not None else models[0]
    ref_names = reference.source.keys()
    everyone = ([base] if base is not None else []) + list(models)
    mismatches: list[str] = []
    ref_set = set(ref_names)
    for model in everyone:
        if model is reference:
            continue
        names = set(model.source.keys())
        for n in ref_names:
            if n not in names:
                mismatches.append(
                    f"tensor {n} is in {reference.label} but missing from {model.label}"
                )
        for n in model.source.keys():
            if n not in ref_set:
                mismatches.append(
                    f"tensor {n} is in {model.label} but missing from {reference.label}"
                )
    positions = layer_position(ref_names)
    tasks = []
    notes: list[str] = []
    for name in ref_names:
        if not all(name in m.source for m in everyone):
            continue  # reported above
        shape, shared, extra = _compare(name, [(m, name) for m in everyone], mismatches)
        if mismatches:
            continue
        info = reference.source.info(name)
        t = positions[name]
        if not _is_float(info.dtype):
            tasks.append(
                TensorTask(name, shape, info.dtype, "copy", {}, t, (reference,), (name,))
            )
            continue
        try:
            kwargs = _resolve(method, name, t, models, global_settings)
        except _ValueProblem as exc:
            values.add(exc)
            continue
        dtype = out_dtype or compute_dtype or _stored_dtype(info.dtype)
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
    _raise_all(problems, mismatches, values)
    _warn_ignored(ignored)
    return MergePlan(method, list(models), base, tasks, compute_dtype, notes)


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
    match = _LAYER.search(name)
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
    compute_dtype, out_dtype = _dtypes(compute_dtype, out_dtype)
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
    values = _ValueProblems()

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
        shape, _, _ = _compare(name, everyone, mismatches)
        if mismatches:
            return
        first, first_name = everyone[0]
        info = first.source.info(first_name)
        if not _is_float(info.dtype):
            tasks.append(TensorTask(name, shape, info.dtype, "copy", {}, t, (first,), (first_name,)))
            return
        models = [m for m, _ in sources]
        checked = _check_method(method, models, base[0] if base else None, where)
        if checked:
            problems.extend(p for p in checked if p not in problems)
            return
        try:
            kwargs = _resolve(method, name, t, models, *levels)
        except _ValueProblem as exc:
            values.add(exc)
            return
        tasks.append(
            TensorTask(
                name,
                shape,
                out_dtype or compute_dtype or _stored_dtype(info.dtype),
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
        _raise_all(problems, mismatches, values)
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
    _raise_all(problems, mismatches, values)
    _warn_ignored(ignored)
    models = list({id(s.model): s.model for piece in slices for s in piece.sources}.values())
    plan = MergePlan(method, models, None, tasks, compute_dtype)
    plan.layers = layer
    return plan


def attach_patches(
    plan: MergePlan, patches: Sequence[tuple[str, TensorSource, float]]
) -> MergePlan:
    """Add ``scale * patch`` to the output tensors each patch holds.

    A patch may hold a subset of the tensors (the others get nothing); a patch
    tensor that is not in the output, has another shape, or is not floating
    point is an error, and every such problem is reported together.
    """
    if not patches:
        return plan
    tasks = {task.name: task for task in plan.tasks}
    added: dict[str, list[tuple[TensorSource, float]]] = {}
    problems: list[str] = []
    for label, source, scale in patches:
        covered = 0
        for name in source.keys():
            task = tasks.get(name)
            if task is None:
                problems.append(f"tensor {name} of patch {label} is not in the merged model")
                continue
            shape = tuple(int(s) for s in source.info(name).shape)
            if shape != task.shape:
                problems.append(
                    f"tensor {name} has shape {list(shape)} in patch {label} "
                    f"but {list(task.shape)} in the merged model"
                )
            elif task.action != "merge":
                problems.append(f"tensor {name} is not floating point; patch {label} cannot add to it")
            else:
                added.setdefault(name, []).append((source, scale))
                covered += 1
        merged = sum(1 for t in plan.tasks if t.action == "merge")
        if covered < merged:
            plan.notes.append(f"patch {label} changes {covered} of the {merged} merged tensors")
    if problems:
        raise CheckpointError(
            f"the patches do not fit the model ({len(problems)} problems): " + "; ".join(problems[:20])
        )
    plan.tasks = [
        replace(task, patches=tuple(added[task.name])) if task.name in added else task
        for task in plan.tasks
    ]
    return plan
