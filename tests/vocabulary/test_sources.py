"""Checkpoints seen through the output vocabulary: rows as the rules say, read in blocks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelfuse.checkpoint import open_checkpoint
from modelfuse.errors import CheckpointError, ConfigError
from modelfuse.vocabulary import TokenizerSettings
from modelfuse.vocabulary.sources import AlignedSource, prepare_vocabulary

from ._tiny import SPECIAL, WORDS, tiny_llama

IM = ["<|im_start|>", "<|im_end|>"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "base": tiny_llama(root / "base", SPECIAL + WORDS, IM, seed=0),
        "a": tiny_llama(root / "a", SPECIAL + WORDS + ["bird"], IM + ["<|tool|>"], seed=1),
        "b": tiny_llama(
            root / "b", SPECIAL + WORDS[::-1] + ["fish"], ["<|eot_id|>"], seed=2, tie=True
        ),
    }


def _open(folders):
    return {k: open_checkpoint(v) for k, v in folders.items()}


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_aligned_rows_follow_the_rules_for_embedding_and_tied_head(folders):
    sources = _open(folders)
    merge = prepare_vocabulary(TokenizerSettings(source="union"), sources, base="base")
    assert merge.size == 15 and merge.tensors == [EMBED, HEAD]
    w = {k: _weights(v) for k, v in folders.items()}
    w["b"][HEAD] = w["b"][EMBED]  # b ties its head to its embedding
    # Output tokens: the base's 11, then bird (a), fish (b), <|tool|> (a), <|eot_id|> (b).
    a_rows = list(range(9)) + [10, 11, 9, None, 12, None]
    b_rows = [0, 1, 2, 8, 7, 6, 5, 4, 3, None, None, None, 9, None, 10]
    base_rows = list(range(11)) + [None] * 4
    fills = {  # token id -> (model, row) giving the fill row
        9: ("base", 9), 10: ("base", 10), 11: ("a", 9), 12: ("b", 9), 13: ("a", 12),
        14: ("b", 10),
    }  # fmt: skip
    for name in (EMBED, HEAD):
        for label, rows in (("base", base_rows), ("a", a_rows), ("b", b_rows)):
            got = merge.sources[label].read(name)
            assert got.shape == (15, 32) and got.dtype == w[label][name].dtype
            for t, r in enumerate(rows):
                model, row = (label, r) if r is not None else fills[t]
                assert torch.equal(got[t], w[model][name][row]), (name, label, t)
            blocks = [
                merge.sources[label].read_rows(name, s, min(s + 4, 15)) for s in (0, 4, 8, 12)
            ]
            assert torch.equal(torch.cat(blocks), got)
            assert merge.sources[label].info(name).shape == (15, 32)
    # Other tensors are the checkpoint's own.
    norm = "model.norm.weight"
    assert torch.equal(merge.sources["a"].read(norm), w["a"][norm])
    assert merge.sources["a"].folder == folders["a"]
    assert HEAD in merge.sources["b"] and HEAD in merge.sources["b"].keys()
    assert "from the base" in merge.notes[0] and "15 tokens" in merge.notes[0]


def test_models_whose_rows_are_already_the_outputs_are_not_wrapped(folders):
    sources = _open(folders)
    merge = prepare_vocabulary(TokenizerSettings(source="base"), sources, base="base")
    assert merge.sources["base"] is sources["base"]
    assert isinstance(merge.sources["a"], AlignedSource) and merge.size == 11


def test_padding_rows_are_the_mean_row(folders):
    sources = _open(folders)
    settings = TokenizerSettings(source="base", pad_to_multiple_of=8)
    merge = prepare_vocabulary(settings, sources, base="base")
    assert merge.size == 16
    got = merge.sources["base"].read(EMBED)
    weights = _weights(folders["base"])[EMBED]
    assert torch.equal(got[:11], weights)
    torch.testing.assert_close(got[11:], weights.mean(dim=0).expand(5, -1))


def test_a_source_not_in_the_merge_is_refused(folders):
    with pytest.raises(
        ConfigError,
        match="tokenizer.source: './c' is not a model of the merge; give union, base or "
        "one of the models \\('base', 'a', 'b'\\)",
    ):
        prepare_vocabulary(TokenizerSettings(source="model:./c"), _open(folders))


def test_a_model_without_tokenizer_files_is_refused(folders, tmp_path):
    bare = tiny_llama(tmp_path / "bare", SPECIAL + WORDS, seed=3, tokenizer=False)
    sources = {**_open(folders), "bare": open_checkpoint(bare)}
    with pytest.raises(CheckpointError, match="models\\[2\\].model: .* has no tokenizer files"):
        prepare_vocabulary(TokenizerSettings(), sources, keys={"bare": "models[2].model"})


def test_a_weights_file_is_refused(tmp_path):
    save_file({EMBED: torch.zeros(4, 2)}, tmp_path / "m.safetensors")
    sources = {"a": open_checkpoint(tmp_path / "m.safetensors")}  # no config.json: no folder
    with pytest.raises(CheckpointError, match="is a weights file, not a model folder"):
        prepare_vocabulary(TokenizerSettings(), sources)


def test_an_architecture_without_a_known_embedding_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"encoder.tokens.weight": torch.zeros(4, 2)}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match="no token embedding found; .* looked for "
        "model.embed_tokens.weight, .*embeddings.word_embeddings.weight",
    ):
        prepare_vocabulary(TokenizerSettings(), {"m": open_checkpoint(tmp_path / "m")})


def test_a_head_with_other_rows_than_the_embedding_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({EMBED: torch.zeros(4, 2), HEAD: torch.zeros(5, 2)}, folder / "model.safetensors")
    with pytest.raises(
        CheckpointError, match="lm_head.weight has shape \\[5, 2\\], but the embedding has 4 rows"
    ):
        prepare_vocabulary(TokenizerSettings(), {"m": open_checkpoint(folder)})
