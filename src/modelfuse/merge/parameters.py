"""Merge parameters: how they are declared, written and resolved per tensor.

Every merge method declares its parameters once, as a pydantic model (a
subclass of :class:`MethodParameters`). A field annotated with
:data:`PER_MODEL` takes one value per input model (``weight``, ``density``);
the others are global (``normalize``, ``lambda``). The configuration (YAML or
keyword arguments), the command line's ``--help`` and every error message come
from that declaration.

A parameter *setting* is written as mergekit writes it:

- a scalar: ``0.5``;
- a gradient: ``[0, 0.3, 1]``, interpolated linearly over the layer index;
- name filters: ``[{filter: self_attn, value: 0.2}, {value: 0.8}]``; the first
  entry whose filter is a substring of the tensor's name wins, an entry
  without a filter (or ``"*"``) is the fallback; a value may itself be a
  gradient.

Layer position ``t``: the tensors of layer ``i`` of ``n`` get ``t = i / (n - 1)``
(``t = 1`` for a single layer); every tensor outside the layers (embeddings,
final norm and output head alike) gets ``t = 0``, so a gradient gives it its
first value, as in mergekit 0.1.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from modelfuse.errors import ConfigError

__all__ = [
    "MERGEKIT_METHODS",
    "MERGEKIT_PARAMETERS",
    "PER_MODEL",
    "Conditional",
    "IgnoredParameterWarning",
    "MethodParameters",
    "ParameterSetting",
    "Scalar",
    "evaluate_setting",
    "format_error",
    "format_validation_error",
    "short",
]

Scalar = bool | int | float | str

MERGEKIT_METHODS = frozenset(
    {
        "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties",
        "della", "della_linear", "karcher", "linear", "model_stock", "multislerp",
        "nearswap", "nuslerp", "passthrough", "ram", "ramplus_tl", "sce", "slerp",
        "task_arithmetic", "ties",
    }
)  # fmt: skip
"""The merge methods of mergekit 0.1.5, by the names its configurations use."""

MERGEKIT_PARAMETERS = frozenset(
    {
        "alpha", "density", "eps", "epsilon", "filter_wise", "gamma", "int8_mask",
        "lambda", "max_iter", "normalize", "normalize_weights", "nuslerp_flatten",
        "nuslerp_row_wise", "r", "rescale", "scale", "select_topk", "t", "tol", "weight",
    }
)  # fmt: skip
"""Every parameter name some mergekit 0.1.5 method reads.

mergekit reads the names its method declares and ignores every other key of
``parameters`` without a word. For a method mergekit has, modelfuse ignores
these names, when the method has no such parameter, with an
:class:`IgnoredParameterWarning` (a ``weight`` on ``model_stock``, a
``density`` on ``task_arithmetic``); any other unknown name is an error, as it
is most likely a misspelling that mergekit would silently drop.
"""


class IgnoredParameterWarning(UserWarning):
    """A configuration key that the merge ignores, as mergekit 0.1.5 does; the merge runs.

    Raised for a parameter name of another mergekit method (see
    :data:`MERGEKIT_PARAMETERS`), a global parameter given under one model's
    ``parameters`` (mergekit reads global parameters only from the top-level
    ``parameters`` and a slice's), and a slice's ``residual_weight``.
    """


class Conditional(BaseModel):
    """One entry of a filtered setting: ``{filter: NAME-PART, value: SETTING}``."""

    model_config = ConfigDict(extra="forbid")

    filter: str | None = None
    value: Scalar | list[float] | list[Scalar]


def _setting_shape(value: Any) -> Any:
    """Refuse a setting of none of the written forms with one message saying which form fails.

    Without this, pydantic reports the failure of every form of the union
    (bool, int, float, string, list, ...), which says nothing useful.
    """
    scalar = (bool, int, float, str)
    entries = value if isinstance(value, list) else [value] if isinstance(value, dict) else None
    if isinstance(value, scalar):
        return value
    if entries is None:
        raise ValueError(
            f"expected a number, a list of numbers (a gradient) or a list of "
            f"{{filter, value}} entries, got {type(value).__name__}"
        )
    if all(isinstance(e, scalar) for e in entries):
        return value
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(
                f"entry {index} is {short(entry)}; a list holds numbers (a gradient) or "
                "{filter, value} entries, not both"
            )
        unknown = [key for key in entry if key not in ("filter", "value")]
        if unknown:
            hint = (
                "; mergekit reads no 'pattern' key (it applies such an entry to every "
                "tensor): write filter"
                if "pattern" in unknown
                else ""
            )
            raise ValueError(
                f"entry {index} has the key {short(unknown[0])}; a filtered setting's "
                f"entries have the keys filter and value{hint}"
            )
        if "value" not in entry:
            raise ValueError(f"entry {index} has no value; write {{filter: ..., value: ...}}")
        nested = entry["value"]
        if not isinstance(nested, scalar) and not (
            isinstance(nested, list) and all(isinstance(e, scalar) for e in nested)
        ):
            raise ValueError(
                f"entry {index}: value must be a number or a list of numbers, "
                f"got {short(nested)}"
            )
    return value


ParameterSetting = Annotated[
    Scalar | list[float] | list[Scalar] | list[Conditional] | Conditional,
    BeforeValidator(_setting_shape),
]


class _PerModel:
    """Marker placed in ``Annotated`` metadata of per-model parameters."""

    def __repr__(self) -> str:
        return "PER_MODEL"


PER_MODEL = _PerModel()
"""Annotate a field ``Annotated[float, PER_MODEL]`` to take one value per model."""


class MethodParameters(BaseModel):
    """Base class of the resolved, validated parameters of a merge method.

    Fields are the parameters of the method for one tensor; per-model fields
    (annotated with :data:`PER_MODEL`) are validated once per model. Fields may
    carry an alias for names that are Python keywords (``lambda``).
    """

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False
    )

    method_name: ClassVar[str] = ""

    @classmethod
    def per_model_fields(cls) -> tuple[str, ...]:
        """Python names of the per-model fields."""
        return tuple(
            name for name, info in cls.model_fields.items() if PER_MODEL in info.metadata
        )

    @classmethod
    def global_fields(cls) -> tuple[str, ...]:
        """Python names of the global fields."""
        per = set(cls.per_model_fields())
        return tuple(name for name in cls.model_fields if name not in per)

    @classmethod
    def config_name(cls, field: str) -> str:
        """The name under which ``field`` is written in a configuration."""
        info = cls.model_fields[field]
        return info.alias or field

    @classmethod
    def field_for(cls, config_name: str) -> str | None:
        """The Python field of a configuration key, or None if the method has no such key."""
        for name, info in cls.model_fields.items():
            if config_name in (name, info.alias):
                return name
        return None

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """Rows ``(name, scope, default, description)`` for help texts and docs."""
        rows = []
        per = set(cls.per_model_fields())
        for name, info in cls.model_fields.items():
            default = "required" if info.is_required() else repr(info.default)
            scope = "per model" if name in per else "global"
            rows.append((cls.config_name(name), scope, default, info.description or ""))
        return rows


def _interpolate(values: Sequence[Any], t: float) -> Any:
    if len(values) == 0:
        raise ConfigError("a gradient needs at least one value, got an empty list")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        scaled = t * (len(values) - 1)
        i0 = min(int(math.floor(scaled)), len(values) - 1)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(values[i0]) + frac * float(values[i1])
    return values[int(t * (len(values) - 1))]


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Resolve one parameter setting for one tensor.

    Parameters
    ----------
    setting : scalar, list of numbers, list of conditionals, or conditional
        The value as written in the configuration.
    tensor_name : str
        The name of the output tensor; filters match substrings of it.
    t : float
        The tensor's layer position in [0, 1].

    Returns
    -------
    The resolved scalar, or ``None`` when filters are given and none matches.

    Examples
    --------
    >>> evaluate_setting([0.0, 1.0], "model.layers.3.mlp.up_proj.weight", 0.25)
    0.25
    >>> evaluate_setting([{"filter": "mlp", "value": 2.0}, {"value": 1.0}], "x.mlp.w", 0.0)
    2.0
    """
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, Mapping):
        setting = [Conditional.model_validate(setting)]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, (list, tuple)):
        if all(isinstance(v, (bool, int, float, str)) for v in setting):
            return _interpolate(setting, t)
        for entry in setting:
            cond = entry if isinstance(entry, Conditional) else Conditional.model_validate(entry)
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return evaluate_setting(cond.value, tensor_name, t)
        return None
    raise ConfigError(
        f"parameter setting {short(setting)} is not a number, a list of numbers (gradient) "
        "or a list of {filter, value} entries"
    )


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about user input.

    Examples
    --------
    >>> short("x" * 100, limit=10)
    "'xxxxxxxx..."
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    try:
        text = repr(value)
    except ValueError:  # an object whose repr is refused (e.g. a huge integer inside it)
        return f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "..."


def format_error(err: Mapping[str, Any]) -> str:
    """``"KEY: what was wrong (got VALUE)"`` for one error of a pydantic ValidationError."""
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if len(loc) > 120:
        loc = loc[:117] + "..."
    text = err["msg"]
    if err["type"] == "extra_forbidden":
        text = "unknown key"
    if err["type"] == "value_error":  # our own validators' messages say what they got
        return f"{loc}: {str(err.get('ctx', {}).get('error', text))[:300]}"
    return f"{loc}: {text} (got {short(err.get('input'))})"


def format_validation_error(exc: ValidationError, *, where: str) -> str:
    """One line from a pydantic ValidationError: each failing key, what was wrong."""
    errors = exc.errors()
    parts = [format_error(err) for err in errors[:MAX_LISTED]]
    if len(errors) > MAX_LISTED:
        parts.append(f"and {len(errors) - MAX_LISTED} more")
    return f"{where}: " + "; ".join(parts)


MAX_LISTED = 20
"""Problems of one kind listed in a message; the others are counted."""
