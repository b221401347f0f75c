"""Each tensor's parameters in a plan: resolved, checked, and every problem gathered.

:func:`resolve_parameters` gives a method's parameters for one tensor (a
model's own settings, then a slice's, then the global ones, gradients and
filters evaluated); :func:`check_keys` and :func:`ignored_keys` judge the
names given; :func:`check_method` the number of models, the base and the
statistics; :func:`raise_all` reports everything found as one error.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from modelfuse.merge.merge_method import MergeMethod
    from modelfuse.merge.plan import ModelInput

__all__ = [
    "ValueProblem",
    "ValueProblems",
    "check_keys",
    "check_method",
    "ignored_keys",
    "raise_all",
    "resolve_parameters",
    "warn_ignored",
]


class ValueProblem(ConfigError):
    """Invalid parameter values for one tensor; ``texts`` say them without the tensor's name.

    Each text is ``"WHERE\\0WHAT"``: the model (empty for a global parameter) and the problem.
    """

    def __init__(self, message: str, texts: list[str], tensor: str) -> None:
        super().__init__(message)
        self.texts = texts
        self.tensor = tensor


class ValueProblems:
    """Invalid parameter values, grouped: one line per problem naming the first tensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, list[str]] = {}

    def add(self, problem: ValueProblem) -> None:
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


def resolve_parameters(
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
        raise ValueProblem(first or name, failures, name)
    if validated is None:  # no models: validate the global settings alone
        try:
            validated = declaration.model_validate(resolved_global)
        except ValidationError as exc:
            raise ValueProblem(
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


def warn_ignored(messages: Sequence[str]) -> None:
    for message in dict.fromkeys(messages):
        warnings.warn(message, IgnoredParameterWarning, stacklevel=3)


def check_method(
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


def raise_all(problems: list[str], mismatches: list[str], values: ValueProblems) -> None:
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
