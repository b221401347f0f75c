"""The merge configuration: YAML (mergekit's format) validated by pydantic.

A mergekit configuration is accepted as it is::

    merge_method: task_arithmetic
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 1.0}
      - model: ./code
        parameters: {weight: [0.2, 0.8]}     # a gradient over the layers
    parameters:
      lambda: 0.8
    dtype: bfloat16
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from modelfuse.errors import ConfigError
from modelfuse.merge.parameters import ParameterSetting, format_validation_error, short
from modelfuse.merge.yaml_reading import read_config_source
from modelfuse.vocabulary.chat_templates import resolve_chat_template
from modelfuse.vocabulary.settings import TokenizerSettings, reference_value

_BOTH_TOKENIZER_KEYS = (
    "both tokenizer_source and tokenizer are given; mergekit reads one: keep tokenizer "
    "(tokenizer_source: X is tokenizer: {source: X})"
)

__all__ = [
    "DTYPES",
    "OUT_DTYPES",
    "DTypeName",
    "MergeConfig",
    "ModelEntry",
    "PatchEntry",
    "SliceEntry",
    "SliceSourceEntry",
    "load_config",
    "resolve_dtype",
]


DTypeName = Literal["float64", "float32", "float16", "bfloat16"]


DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


OUT_DTYPES: dict[str, torch.dtype] = {
    **DTYPES,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
"""Dtypes the merged tensors may be written in (``out_dtype``): float8 only when asked for."""


def resolve_dtype(name: str | None, *, key: str = "dtype") -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16``; None stays None; unknown names list the valid ones.

    ``key="out_dtype"`` also accepts ``float8_e4m3fn`` and ``float8_e5m2``.
    """
    if name is None:
        return None
    table = OUT_DTYPES if key == "out_dtype" else DTYPES
    try:
        return table[name]
    except KeyError:
        valid = ", ".join(dict.fromkeys(str(v).removeprefix("torch.") for v in table.values()))
        raise ConfigError(f"{key}: unknown dtype {short(name)}; valid: {valid}") from None


def _finite_settings(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """Refuse NaN and inf anywhere in parameter settings, naming the key."""
    if value is None:
        return value
    for key, setting in value.items():
        stack = [setting]
        while stack:
            item = stack.pop()
            if isinstance(item, BaseModel):
                item = item.model_dump()
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(
                    f"{short(key)}: {item} is not a finite number; give a finite value"
                )
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
    return value


LayerIndex = Annotated[int, Field(ge=0, lt=2**31)]
"""A layer index as written in ``layer_range`` (checked against the model's layers when planned)."""


class ModelEntry(BaseModel):
    """One input model: ``{model: PATH, parameters: {...}, statistics: PATH}``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="local path of a checkpoint file or model folder")
    parameters: dict[str, ParameterSetting] | None = Field(
        None, description="per-model parameter settings (override the global ones)"
    )
    statistics: str | None = Field(
        None,
        description="safetensors file of statistics (Fisher diagonal or Gram matrices) "
        "for data-aware methods",
    )

    _finite = field_validator("parameters")(classmethod(lambda cls, v: _finite_settings(v)))


class SliceSourceEntry(BaseModel):
    """One source of an output slice: ``{model: PATH, layer_range: [START, STOP]}``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="local path of a checkpoint file or model folder")
    layer_range: tuple[LayerIndex, LayerIndex] = Field(
        description="layers [START, STOP) of the model"
    )

    @field_validator("layer_range", mode="before")
    @classmethod
    def _layer_indices(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            for bound in value:
                if isinstance(bound, float) and not (
                    math.isfinite(bound) and bound.is_integer() and 0 <= bound < 2**31
                ):
                    raise ValueError(
                        f"{short(bound)} is not a layer index; give [START, STOP) as whole "
                        "numbers within the model's layers"
                    )
        return value
    parameters: dict[str, ParameterSetting] | None = Field(
        None, description="per-source parameter settings"
    )

    _finite = field_validator("parameters")(classmethod(lambda cls, v: _finite_settings(v)))


class SliceEntry(BaseModel):
    """One output slice: ``{sources: [...], base_model: PATH, parameters: {...}}``."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSourceEntry] = Field(min_length=1)
    base_model: str | None = Field(None, description="the slice's base model (one of its sources)")
    parameters: dict[str, ParameterSetting] | None = Field(
        None, description="parameter settings for this slice"
    )
    residual_weight: FiniteFloat | None = Field(
        None,
        description="accepted for mergekit configurations, which read it nowhere; ignored "
        "with a warning",
    )

    _finite = field_validator("parameters")(classmethod(lambda cls, v: _finite_settings(v)))


class PatchEntry(BaseModel):
    """A task-vector patch applied to the merged model: ``theta + scale * patch``."""

    model_config = ConfigDict(extra="forbid")

    patch: str = Field(description="a patch written by `modelfuse diff`")
    scale: FiniteFloat = Field(1.0, description="the patch's factor; negative removes it")


class MergeConfig(BaseModel):
    """A merge: the method, the models (or slices), the base and the parameters."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str = Field(description="name of a registered merge method")
    models: list[ModelEntry] | None = Field(None, description="the models to merge")
    slices: list[SliceEntry] | None = Field(
        None, description="output layer slices (mergekit's slices: syntax) instead of models"
    )
    base_model: str | None = Field(None, description="the base (pre-trained) model")
    base_statistics: str | None = Field(
        None,
        description="safetensors file of the base model's Fisher diagonal, for "
        "gradient_matching (its precision H_0)",
    )
    parameters: dict[str, ParameterSetting] | None = Field(
        None, description="global parameter settings"
    )
    dtype: str | None = Field(None, description="compute dtype the inputs are cast to")
    out_dtype: str | None = Field(None, description="dtype of the written tensors")
    patches: list[PatchEntry] | None = Field(
        None, description="task-vector patches added to the merged model"
    )
    tokenizer_source: str | None = Field(
        None,
        description="the output vocabulary: union, base, or a model's path (model:PATH); "
        "without it (and without tokenizer) the base model's tokenizer files are copied",
    )
    tokenizer: TokenizerSettings | None = Field(
        None,
        description="mergekit's tokenizer mapping: source, tokens (per-token row sources), "
        "pad_to_multiple_of",
    )
    chat_template: str | None = Field(
        None, description="a built-in chat template name, auto, or a Jinja template"
    )
    allow_prefix: bool = Field(
        False,
        description="match models whose tensor names differ by a prefix (a classifier's "
        "'bert.' around a BertModel base); the output takes the reference's names",
    )
    heads: Literal["keep", "drop"] | None = Field(
        None,
        description="tensors only a model has (its task head): keep (written to "
        "OUT/heads/NAME/) or drop; without it they are an error",
    )

    _finite = field_validator("parameters")(classmethod(lambda cls, v: _finite_settings(v)))

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(
                f"unknown dtype {short(value)}; valid: float64, float32, float16, bfloat16"
            )
        return value

    @field_validator("out_dtype")
    @classmethod
    def _known_out_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in OUT_DTYPES:
            raise ValueError(
                f"unknown dtype {short(value)}; valid: float64, float32, float16, bfloat16, "
                "float8_e4m3fn, float8_e5m2"
            )
        return value

    @field_validator("tokenizer_source", mode="before")
    @classmethod
    def _tokenizer_reference(cls, value: Any) -> Any:
        return reference_value(value)  # model:PATH and {model: PATH} read as PATH

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        if value is not None and value != "auto":
            try:
                resolve_chat_template(value, where="")
            except ConfigError as exc:
                raise ValueError(str(exc).removeprefix(": ")) from None
        return value

    @model_validator(mode="after")
    def _one_tokenizer_key(self) -> MergeConfig:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError(_BOTH_TOKENIZER_KEYS)
        return self

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeConfig:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' and 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty; list at least one model")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty; list at least one slice")
        return self

    @field_validator("models", mode="before")
    @classmethod
    def _bare_paths(cls, value: Any) -> Any:
        # ``models: [./a, ./b]`` is a convenient shorthand for ``[{model: ./a}, ...]``.
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value


def load_config(source: str | Path | dict[str, Any] | MergeConfig) -> tuple[MergeConfig, Path]:
    """Read and validate a configuration.

    Parameters
    ----------
    source : path, dict or MergeConfig
        A YAML file, an already-parsed mapping, or a configuration.

    Returns
    -------
    (MergeConfig, Path)
        The configuration and the folder that relative model paths are
        resolved against as a fall-back (the YAML file's folder, else the
        working directory).

    Raises
    ------
    ConfigError
        The file is missing or not YAML, or a key is unknown or invalid; the
        message names the file and every offending key.

    Examples
    --------
    >>> cfg, _ = load_config({"merge_method": "linear", "models": ["a", "b"]})
    >>> [m.model for m in cfg.models]
    ['a', 'b']
    """
    if isinstance(source, MergeConfig):
        return source, Path.cwd()
    data, where, folder = read_config_source(
        source,
        several_documents="a multi-stage file of several merges; run it with merge_multistage "
        "(`modelfuse merge` runs either kind)",
    )
    if data is None:
        raise ConfigError(
            f"{where}: the configuration is empty; write merge_method and models (or slices)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: expected a mapping with merge_method and models, got {type(data).__name__}"
        )
    if "experts" in data and "merge_method" not in data:
        raise ConfigError(
            f"{where}: a mergekit-moe configuration (experts, gate_mode), not a merge; "
            "run it with modelfuse moe CONFIG OUT, which builds the mixture of experts"
        )
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        raise ConfigError(f"{where}: {_BOTH_TOKENIZER_KEYS}")
    try:
        return MergeConfig.model_validate(data), folder
    except ValidationError as exc:
        message = format_validation_error(exc, where=where)
        if any(err["type"] == "extra_forbidden" for err in exc.errors()):
            message += "; valid keys: " + ", ".join(MergeConfig.model_fields)
        raise ConfigError(message) from None
