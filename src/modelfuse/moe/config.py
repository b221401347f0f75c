"""The mixture-of-experts configuration: mergekit-moe's YAML, validated.

A ``mergekit-moe`` configuration is read as mergekit 0.1.5 reads it::

    base_model: ./base
    gate_mode: hidden            # hidden | cheap_embed | random (and mergekit's variants)
    dtype: bfloat16
    experts_per_token: 2
    experts:
      - source_model: ./math
        positive_prompts: ["solve the equation"]
      - source_model: ./code
        positive_prompts: ["write a python function"]
        negative_prompts: ["solve the equation"]

Unlike mergekit, which ignores keys it does not know, an unknown key is an
error naming it, so that a typo never goes unnoticed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from modelfuse.errors import ConfigError
from modelfuse.merge.config import DTYPES
from modelfuse.merge.parameters import format_validation_error, short
from modelfuse.merge.yaml_reading import read_config_source

__all__ = ["MOE_DTYPES", "ExpertEntry", "MoeConfig", "load_moe_config", "resolve_moe_dtype"]

MOE_DTYPES = ("bfloat16", "float16", "float32", "float64")
"""The dtypes mergekit-moe's ``dtype`` names (``torch.`` prefixed or not)."""


def _not_bool(value: Any) -> Any:
    """Refuse ``true``/``false`` where a number belongs (pydantic would read them as 1 and 0)."""
    if isinstance(value, bool):
        raise ValueError(f"{value} is not a number; give a number")
    return value


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number; give a finite value")
    return value


class ExpertEntry(BaseModel):
    """One expert: a model whose MLPs become one expert of every layer."""

    model_config = ConfigDict(extra="forbid")

    source_model: str = Field(description="local path of the expert's model folder")
    positive_prompts: list[str] | None = Field(
        None, description="prompts that should be routed to this expert"
    )
    negative_prompts: list[str] | None = Field(
        None, description="prompts whose direction is subtracted from the positive ones"
    )
    noise_scale: float | None = Field(
        None, description="standard deviation of Gaussian noise added to the expert's MLP weights"
    )
    residual_scale: float | None = Field(
        None, description="factor applied to the expert's down_proj (its residual output)"
    )

    _numbers = field_validator("noise_scale", "residual_scale", mode="before")(
        classmethod(lambda cls, v: _not_bool(v))
    )
    _finite_scales = field_validator("noise_scale", "residual_scale")(
        classmethod(lambda cls, v: _finite(v))
    )


class MoeConfig(BaseModel):
    """A mixture of experts built from a base model and expert models (mergekit-moe's format)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="the model giving every tensor outside the MLPs")
    experts: list[ExpertEntry] = Field(min_length=1, description="one entry per expert")
    gate_mode: str = Field(
        "hidden", description="how the router weights are made (see modelfuse.moe.GATE_MODES)"
    )
    dtype: str | None = Field(None, description="dtype of the written tensors")
    experts_per_token: int = Field(2, description="experts each token is routed to")
    shared_experts: list[ExpertEntry] | None = Field(
        None, description="experts every token uses (one, for a Qwen2-MoE output)"
    )
    architecture: str | None = Field(
        None, description="output architecture: mixtral or qwen (a prefix of the name)"
    )
    tokenizer_source: str | None = Field(
        None, description="only 'base': the base model's tokenizer is copied"
    )
    tokenizer: dict[str, Any] | None = Field(
        None, description="only {source: base}: the base model's tokenizer is copied"
    )

    _number = field_validator("experts_per_token", mode="before")(
        classmethod(lambda cls, v: _not_bool(v))
    )

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value.removeprefix("torch.") not in MOE_DTYPES:
            raise ValueError(f"unknown dtype {short(value)}; valid: {', '.join(MOE_DTYPES)}")
        return value

    @field_validator("tokenizer_source")
    @classmethod
    def _base_tokenizer(cls, value: str | None) -> str | None:
        if value is not None and value != "base":
            raise ValueError(
                f"{short(value)} is not supported; modelfuse moe copies the base model's "
                "tokenizer (tokenizer_source: base); leave the key out or write base"
            )
        return value

    @field_validator("tokenizer")
    @classmethod
    def _base_tokenizer_block(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value != {"source": "base"}:
            raise ValueError(
                f"{short(value)} is not supported; modelfuse moe copies the base model's "
                "tokenizer ({source: base}); leave the key out or write {source: base}"
            )
        return value

    def prompt_experts(self) -> list[ExpertEntry]:
        """The experts and shared experts, in mergekit's order."""
        return [*self.experts, *(self.shared_experts or [])]


def load_moe_config(source: str | Path | dict[str, Any] | MoeConfig) -> tuple[MoeConfig, Path]:
    """Read and validate a mergekit-moe configuration.

    Parameters
    ----------
    source : path, dict or MoeConfig
        A YAML file, an already parsed mapping, or a configuration.

    Returns
    -------
    (MoeConfig, Path)
        The configuration and the folder relative model paths are also
        looked up in (the YAML file's folder, else the working directory).

    Raises
    ------
    ConfigError
        The file is missing or not YAML, a key is unknown or has a wrong
        type; the message names the file and the key.

    Examples
    --------
    >>> cfg, _ = load_moe_config({"base_model": "b", "experts": [{"source_model": "e"}]})
    >>> cfg.gate_mode, cfg.experts_per_token
    ('hidden', 2)
    >>> load_moe_config({"base_model": "b", "experts": [], "gate_mod": "x"})
    Traceback (most recent call last):
    ...
    modelfuse.errors.ConfigError: configuration: experts: List should have at least 1 item \
after validation, not 0 (got []); gate_mod: unknown key (got 'x'); valid keys: base_model, \
experts, gate_mode, dtype, experts_per_token, shared_experts, architecture, tokenizer_source, \
tokenizer
    """
    if isinstance(source, MoeConfig):
        return source, Path.cwd()
    data, where, folder = read_config_source(source)
    if data is None:
        raise ConfigError(f"{where}: the configuration is empty; write base_model and experts")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: expected a mapping with base_model and experts, got {type(data).__name__}"
        )
    if "merge_method" in data and "experts" not in data:
        raise ConfigError(
            f"{where}: a merge configuration (merge_method), not a mixture of experts; "
            "run it with modelfuse merge CONFIG OUT"
        )
    try:
        return MoeConfig.model_validate(data), folder
    except ValidationError as exc:
        message = format_validation_error(exc, where=where)
        if any(err["type"] == "extra_forbidden" for err in exc.errors()):
            message += "; valid keys: " + ", ".join(MoeConfig.model_fields)
        raise ConfigError(message) from None


def resolve_moe_dtype(name: str | None) -> Any:
    """The torch dtype a configuration's ``dtype`` names (``torch.`` prefix allowed), or None."""
    if name is None:
        return None
    return DTYPES[name.removeprefix("torch.")]
