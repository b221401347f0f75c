"""The output vocabulary (union, base, a model's) and each model's rows, worked out by hand."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.vocabulary import (
    build_vocabulary,
    load_tokenizer,
    resolve_chat_template,
    tokenizer_files,
)

from ._tiny import SPECIAL, WORDS, word_tokenizer

IM = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizers():
    """base: 9 words + 2 added; a: + bird, + <|tool|>; b: words reversed, + fish, + <|eot_id|>."""
    return {
        "base": word_tokenizer(SPECIAL + WORDS, IM),
        "a": word_tokenizer(SPECIAL + WORDS + ["bird"], IM + ["<|tool|>"]),
        "b": word_tokenizer(SPECIAL + WORDS[::-1] + ["fish"], ["<|eot_id|>"]),
    }


BASE_TOKENS = SPECIAL + WORDS + IM  # ids 0-10


def test_union_appends_plain_tokens_then_added_ones_in_model_order(tokenizers):
    v = build_vocabulary(tokenizers, source="union")
    order = sorted(v.tokens, key=v.tokens.get)
    assert order == BASE_TOKENS + ["bird", "fish", "<|tool|>", "<|eot_id|>"]
    assert list(v.tokens.values()) == list(range(15)) and v.size == 15
    assert v.added == ("bird", "fish", "<|tool|>", "<|eot_id|>")
    # Each model's row of each output token, from its own word list.
    assert v.rows["base"].tolist() == list(range(11)) + [-1] * 4
    assert v.rows["a"].tolist() == list(range(9)) + [10, 11, 9, -1, 12, -1]
    assert v.rows["b"].tolist() == [0, 1, 2, 8, 7, 6, 5, 4, 3, -1, -1, -1, 9, -1, 10]
    # Added special tokens keep their settings; the new plain words are plain.
    decoder = {info.content: info for info in v.tokenizer.added_tokens_decoder.values()}
    assert decoder["<|tool|>"].special and decoder["<|eot_id|>"].special
    assert not decoder["bird"].special
    assert v.tokenizer("the bird <|tool|> fish").input_ids == [3, 11, 13, 12]
    assert v.is_identity("base") is False  # 11 rows, 15 output rows


def test_union_leaves_the_given_tokenizers_unchanged(tokenizers):
    before = {k: dict(t.get_vocab()) for k, t in tokenizers.items()}
    build_vocabulary(tokenizers, source="union", add_tokens=["<|x|>"])
    assert {k: dict(t.get_vocab()) for k, t in tokenizers.items()} == before


def test_base_source_keeps_the_base_vocabulary_and_maps_the_others_into_it(tokenizers):
    v = build_vocabulary(tokenizers, source="base", base="b")
    assert sorted(v.tokens, key=v.tokens.get) == SPECIAL + WORDS[::-1] + ["fish", "<|eot_id|>"]
    assert v.rows["b"].tolist() == list(range(11)) and v.is_identity("b")
    assert v.rows["base"].tolist() == [0, 1, 2, 8, 7, 6, 5, 4, 3, -1, -1]
    assert v.added == ()


def test_a_model_source_takes_that_models_tokenizer_and_adds_named_tokens(tokenizers):
    v = build_vocabulary(tokenizers, source="a", add_tokens=["<|new|>", "cat"])
    assert sorted(v.tokens, key=v.tokens.get) == (
        SPECIAL + WORDS + ["bird"] + IM + ["<|tool|>", "<|new|>"]
    )
    assert v.added == ("<|new|>",)
    assert v.rows["a"].tolist() == list(range(13)) + [-1]


def test_tokens_beyond_a_models_embedding_rows_count_as_lacking(tokenizers):
    v = build_vocabulary(tokenizers, {"base": 11, "a": 10, "b": 11}, source="union")
    # a's three added tokens (ids 10-12) are past its 10 rows: not in a, so <|tool|> is in no model.
    assert v.rows["a"].tolist()[9:] == [-1, -1, 9, -1, -1]  # im_start, im_end, bird, fish, eot
    assert "<|tool|>" not in v.tokens
    assert v.model_rows == {"base": 11, "a": 10, "b": 11}


def test_unknown_source_or_base_is_refused(tokenizers):
    with pytest.raises(ConfigError, match="tokenizer source './c' is not a model of the merge"):
        build_vocabulary(tokenizers, source="./c")
    with pytest.raises(ConfigError, match="base model"):
        build_vocabulary(tokenizers, base="./c")


def test_tokenizer_files_reload_with_the_chat_template_in_tokenizer_config(tokenizers, tmp_path):
    from transformers import AutoTokenizer

    v = build_vocabulary(tokenizers, source="union")
    template = resolve_chat_template("chatml")
    files = tokenizer_files(v.tokenizer, template)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    config = json.loads(files["tokenizer_config.json"])
    assert config["chat_template"] == template
    assert not {"is_local", "local_files_only"} & set(config)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == v.tokens and reloaded.chat_template == template
    assert v.tokenizer.chat_template is None  # the built tokenizer was not changed


def test_load_tokenizer_refuses_folders_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="models\\[1\\].model: .* has no tokenizer files"):
        load_tokenizer(tmp_path, where="models[1].model")
    with pytest.raises(CheckpointError, match="is not a model folder"):
        load_tokenizer(tmp_path / "config.json", where="base_model")


def test_load_tokenizer_refuses_unreadable_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="its tokenizer cannot be read"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_reads_a_saved_folder(tokenizers, tmp_path):
    tokenizers["b"].save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).get_vocab() == tokenizers["b"].get_vocab()
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    np.testing.assert_array_equal(
        build_vocabulary({"b": load_tokenizer(tmp_path)}).rows["b"], np.arange(11)
    )
