"""The vocabulary keys of a merge configuration, as mergekit 0.1.5 reads them.

Two spellings, never both::

    tokenizer_source: union          # or base, or a model's path (model:PATH also reads)

    tokenizer:
      source: union                  # the default; base; or a model's path
      tokens:                        # optional: where chosen tokens' rows come from
        <|im_start|>:
          source: ./chatml_model     # that model's row when a model lacks the token
        <|eot_id|>:
          source: ./llama3_model
          force: true                # that model's row for every model
        <|renamed|>:
          source: {kind: model_token, model: ./a, token: <|old|>}   # or token_id: 12
        <|unused|>:
          source: {kind: zero}
      pad_to_multiple_of: 64         # optional: rows padded with the mean row

``chat_template`` (a built-in name, ``auto`` or a Jinja template) is read by
:mod:`modelfuse.vocabulary.chat_templates`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from modelfuse.errors import ConfigError

__all__ = [
    "MODEL_PREFIX",
    "ModelTokenSource",
    "TokenSource",
    "TokenSetting",
    "TokenizerSettings",
    "ZeroSource",
    "model_reference",
    "reference_value",
    "tokenizer_settings",
    "with_model_references",
]

MODEL_PREFIX = "model:"
"""``tokenizer_source: model:PATH`` names a model as plain ``PATH`` does."""

MAX_TOKEN_LENGTH = 1024
"""Longest token text a ``tokens:`` entry may name."""


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "..."


def model_reference(value: str) -> str:
    """A model reference as written, without a leading ``model:``.

    Examples
    --------
    >>> model_reference("model:./chat"), model_reference("./chat")
    ('./chat', './chat')
    """
    return value[len(MODEL_PREFIX) :] if value.startswith(MODEL_PREFIX) else value


def reference_value(value: Any) -> Any:
    """A model reference written as mergekit allows (``PATH``, ``model:PATH``, ``{model: PATH}``) -> PATH.

    Other values are returned as they are (for the validator to refuse).

    Examples
    --------
    >>> reference_value({"model": "./chat"}), reference_value("model:./chat")
    ('./chat', './chat')
    """
    if isinstance(value, dict) and "kind" not in value and "model" in value:
        extra = sorted(set(value) - {"model"})
        if extra:
            raise ValueError(
                f"{', '.join(extra)} in a model reference is not supported; give the path of "
                "the model's folder (merge a LoRA into its model first)"
            )
        value = value["model"]
    if isinstance(value, str):
        return model_reference(value)
    return value


class ModelTokenSource(BaseModel):
    """Another token's row of one model: ``{kind: model_token, model: PATH, token: T}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["model_token"]
    model: str = Field(min_length=1, description="the model whose row is taken")
    token_id: Annotated[int, Field(ge=0, lt=2**31)] | None = Field(
        None, description="the row's index in that model's embedding"
    )
    token: str | None = Field(
        None, min_length=1, max_length=MAX_TOKEN_LENGTH, description="a token of that model"
    )

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token and token_id")
        return self

    @field_validator("model")
    @classmethod
    def _strip_prefix(cls, value: str) -> str:
        return model_reference(value)


class ZeroSource(BaseModel):
    """A row of zeros: ``{kind: zero}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["zero"]


def _source_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "path"
    if isinstance(value, dict):
        kind = value.get("kind")
        return kind if kind in ("model_token", "zero") else None
    return getattr(value, "kind", None)


TokenSource = Annotated[
    Annotated[ModelTokenSource, Tag("model_token")]
    | Annotated[ZeroSource, Tag("zero")]
    | Annotated[str, Tag("path")],
    Discriminator(
        _source_kind,
        custom_error_type="token_source",
        custom_error_message="expected a model's path, {kind: model_token, model: PATH, "
        "token: TOKEN} (or token_id: ROW) or {kind: zero}",
    ),
]
"""Where a token's row comes from: a model's path, another token of a model, or zeros."""


class TokenSetting(BaseModel):
    """Where one output token's row comes from for the models that lack it (or all, ``force``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: TokenSource | None = Field(
        None, description="a model's path, {kind: model_token, ...} or {kind: zero}"
    )
    force: bool = Field(False, description="use the source's row for every model")

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value: Any) -> Any:
        value = reference_value(value)
        if value == "":
            raise ValueError("an empty model path; give a model of the merge")
        return value


class TokenizerSettings(BaseModel):
    """mergekit's ``tokenizer:`` mapping (``tokenizer_source: X`` is ``tokenizer: {source: X}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        "union", min_length=1, description="union, base, or a model's path (model:PATH)"
    )
    tokens: (
        dict[Annotated[str, Field(min_length=1, max_length=MAX_TOKEN_LENGTH)], TokenSetting] | None
    ) = Field(None, description="per-token row sources; tokens not in the vocabulary are added")
    pad_to_multiple_of: Annotated[int, Field(ge=1, le=2**20)] | None = Field(
        None, description="pad the vocabulary's rows to a multiple of this"
    )

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value: Any) -> Any:
        return reference_value(value)

    @property
    def kind(self) -> Literal["union", "base", "model"]:
        """``"union"``, ``"base"`` or ``"model"`` (then :attr:`source` is the model's path)."""
        if self.source in ("union", "base"):
            return self.source  # type: ignore[return-value]
        return "model"


def tokenizer_settings(
    tokenizer_source: str | None = None,
    tokenizer: TokenizerSettings | dict[str, Any] | None = None,
    *,
    where: str = "configuration",
) -> TokenizerSettings | None:
    """The vocabulary settings of a configuration, from either spelling (None: no vocabulary).

    Raises
    ------
    ConfigError
        Both ``tokenizer_source`` and ``tokenizer`` are given, as mergekit refuses.

    Examples
    --------
    >>> tokenizer_settings("model:./chat").source
    './chat'
    >>> tokenizer_settings(tokenizer={"tokens": {"<x>": {"source": {"kind": "zero"}}}}).source
    'union'
    >>> tokenizer_settings() is None
    True
    """
    if tokenizer_source is not None and tokenizer is not None:
        raise ConfigError(
            f"{where}: both tokenizer_source and tokenizer are given; mergekit reads one: "
            "keep tokenizer (tokenizer_source: X is tokenizer: {source: X})"
        )
    if tokenizer is not None:
        return (
            tokenizer
            if isinstance(tokenizer, TokenizerSettings)
            else TokenizerSettings.model_validate(tokenizer)
        )
    if tokenizer_source is not None:
        try:
            tokenizer_source = reference_value(tokenizer_source)
        except ValueError as exc:
            raise ConfigError(f"{where}: tokenizer_source: {exc}") from None
        if not isinstance(tokenizer_source, str) or not tokenizer_source:
            raise ConfigError(
                f"{where}: tokenizer_source: expected union, base or a model's path, got "
                f"{_short(tokenizer_source)}"
            )
        return TokenizerSettings(source=tokenizer_source)
    return None


def with_model_references(
    tokenizer_source: str | None,
    tokenizer: TokenizerSettings | None,
    replace: Callable[[str, str], str],
) -> tuple[str | None, TokenizerSettings | None]:
    """``tokenizer_source`` and ``tokenizer`` with every model they name replaced by
    ``replace(reference, key)`` (``key`` says where, for messages): the vocabulary's
    source (not ``union`` or ``base``) and each token's source model. A multi-stage
    merge locates and binds these as it does the merged models.

    Examples
    --------
    >>> settings = TokenizerSettings(tokens={"<x>": {"source": "chat"}})
    >>> _, done = with_model_references(None, settings, lambda r, key: "./" + r)
    >>> done.tokens["<x>"].source
    './chat'
    """

    def model(reference: str, key: str) -> str:
        return reference if reference in ("union", "base") else replace(reference, key)

    if tokenizer_source is not None:
        tokenizer_source = model(tokenizer_source, "tokenizer_source")
    if tokenizer is None:
        return tokenizer_source, None
    tokens = None
    if tokenizer.tokens is not None:
        tokens = {}
        for token, setting in tokenizer.tokens.items():
            key = f"tokenizer.tokens.{token!r}.source"
            source = setting.source
            if isinstance(source, str):
                source = replace(source, key)
            elif isinstance(source, ModelTokenSource):
                source = source.model_copy(update={"model": replace(source.model, key + ".model")})
            tokens[token] = setting.model_copy(update={"source": source})
    return tokenizer_source, tokenizer.model_copy(
        update={"source": model(tokenizer.source, "tokenizer.source"), "tokens": tokens}
    )
