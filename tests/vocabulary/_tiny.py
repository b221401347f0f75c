"""Tiny Llamas with word-level tokenizers, built offline for the vocabulary tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AddedToken, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = ["the", "cat", "dog", "sat", "on", "mat"]


def word_tokenizer(
    words: list[str], added: list[str] = (), chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over ``words`` (ids in that order) plus special ``added`` tokens."""
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if added:
        tokenizer.add_tokens([AddedToken(a, special=True) for a in added], special_tokens=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama(
    folder: Path,
    words: list[str],
    added: list[str] = (),
    *,
    seed: int,
    rows: int | None = None,
    tie: bool = False,
    chat_template: str | None = None,
    tokenizer: bool = True,
) -> Path:
    """A 2-layer Llama (hidden 32) whose embedding has one row per token (or ``rows``)."""
    tok = word_tokenizer(words, list(added), chat_template)
    config = LlamaConfig(
        vocab_size=rows or len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return folder
