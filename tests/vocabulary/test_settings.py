"""The tokenizer_source / tokenizer keys read as mergekit 0.1.5 reads them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from modelfuse.errors import ConfigError
from modelfuse.vocabulary import (
    ModelTokenSource,
    TokenizerSettings,
    ZeroSource,
    tokenizer_settings,
)


@pytest.mark.parametrize(
    ("given", "source", "kind"),
    [
        ("union", "union", "union"),
        ("base", "base", "base"),
        ("./chat", "./chat", "model"),
        ("model:./chat", "./chat", "model"),
        ({"model": "./chat"}, "./chat", "model"),
    ],
)
def test_tokenizer_source_is_a_tokenizer_mapping_with_that_source(given, source, kind):
    settings = tokenizer_settings(given)
    assert (settings.source, settings.kind, settings.tokens, settings.pad_to_multiple_of) == (
        source,
        kind,
        None,
        None,
    )


def test_tokenizer_mapping_defaults_to_union_and_reads_every_token_source():
    settings = tokenizer_settings(
        tokenizer={
            "tokens": {
                "<a>": {"source": "model:./m"},
                "<b>": {"source": "./m", "force": True},
                "<c>": {"source": {"kind": "model_token", "model": "./m", "token": "<x>"}},
                "<d>": {"source": {"kind": "model_token", "model": "./m", "token_id": 3}},
                "<e>": {"source": {"kind": "zero"}},
                "<f>": {},
            },
            "pad_to_multiple_of": 8,
        }
    )
    tokens = settings.tokens
    assert settings.source == "union" and settings.pad_to_multiple_of == 8
    assert (tokens["<a>"].source, tokens["<a>"].force) == ("./m", False)
    assert (tokens["<b>"].source, tokens["<b>"].force) == ("./m", True)
    assert tokens["<c>"].source == ModelTokenSource(kind="model_token", model="./m", token="<x>")
    assert tokens["<d>"].source.token_id == 3 and tokens["<d>"].source.token is None
    assert tokens["<e>"].source == ZeroSource(kind="zero")
    assert tokens["<f>"].source is None and not tokens["<f>"].force


def test_no_vocabulary_keys_means_no_settings():
    assert tokenizer_settings() is None


def test_both_spellings_are_refused_as_mergekit_does():
    with pytest.raises(ConfigError, match="both tokenizer_source and tokenizer"):
        tokenizer_settings("union", {"source": "base"})


@pytest.mark.parametrize(
    "bad",
    [
        {"tokens": {"<a>": {"source": {"kind": "model_token", "model": "./m"}}}},
        {
            "tokens": {
                "<a>": {
                    "source": {"kind": "model_token", "model": "./m", "token": "x", "token_id": 1}
                }
            }
        },
        {"tokens": {"<a>": {"source": {"kind": "model_token", "model": "./m", "token_id": -1}}}},
        {"tokens": {"<a>": {"source": {"kind": "random"}}}},
        {"tokens": {"<a>": {"source": ""}}},
        {"tokens": {"": {"source": "./m"}}},
        {"tokens": {"<a>": {"force": "sometimes"}}},
        {"pad_to_multiple_of": 0},
        {"source": ""},
        {"sourse": "union"},
    ],
)
def test_malformed_tokenizer_mappings_are_refused(bad):
    with pytest.raises(ValidationError):
        TokenizerSettings.model_validate(bad)


@pytest.mark.parametrize("bad", ["", 3])
def test_tokenizer_source_must_be_a_non_empty_string(bad):
    with pytest.raises(ConfigError, match="tokenizer_source: expected union, base or a model"):
        tokenizer_settings(bad)


def test_a_model_reference_with_a_lora_is_refused():
    with pytest.raises(ConfigError, match="lora in a model reference is not supported"):
        tokenizer_settings({"model": "./m", "lora": "./adapter"})
    with pytest.raises(ValidationError, match="lora in a model reference is not supported"):
        TokenizerSettings.model_validate(
            {"tokens": {"<a>": {"source": {"model": "./m", "lora": "./l"}}}}
        )


def test_a_mapping_reference_reads_as_its_path():
    settings = TokenizerSettings.model_validate(
        {"source": {"model": "./a"}, "tokens": {"<a>": {"source": {"model": "./b"}}}}
    )
    assert settings.source == "./a" and settings.tokens["<a>"].source == "./b"
