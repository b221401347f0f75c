"""Tiny Llamas (a base and experts) with a word-level tokenizer, built offline for the MoE tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = SPECIAL + [f"w{i}" for i in range(97)]  # a vocabulary of 100 tokens
PROMPTS = {  # what should go to each expert: its own words, each one last in some prompt
    0: ["w10 w11", "w11 w10"],
    1: ["w40 w41", "w41 w40"],
    2: ["w70 w71", "w71 w70", "w70"],
    3: ["w90 w91", "w91 w90"],
}


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over :data:`WORDS` (ids in that order), BOS ``<s>``, EOS ``</s>``."""
    backend = Tokenizer(
        models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def llama_config(**changes: object) -> LlamaConfig:
    settings = dict(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )
    settings.update(changes)
    return LlamaConfig(**settings)


def base_llama(folder: Path, *, seed: int = 0, tokenizer: bool = True, **changes: object) -> Path:
    """A 2-layer Llama (hidden 32, vocabulary 100) saved with its tokenizer."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**changes))
    with torch.no_grad():  # distinct words get clearly distinct embeddings
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    if tokenizer:
        word_tokenizer().save_pretrained(folder)
    return folder


def expert_llama(folder: Path, base: Path, *, seed: int, model_type: str | None = None) -> Path:
    """``base`` with every MLP weight perturbed from ``seed`` (other tensors unchanged)."""
    model = LlamaForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(folder)
    if model_type is not None:
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = model_type
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def build_models(root: Path, experts: int = 2) -> tuple[Path, list[Path]]:
    """``root/base`` and ``root/e0`` ... experts of it."""
    base = base_llama(root / "base")
    return base, [expert_llama(root / f"e{i}", base, seed=100 + i) for i in range(experts)]


def moe_config(base: Path, experts: list[Path], **settings: object) -> dict[str, object]:
    """A mergekit-moe configuration: expert i gets PROMPTS[i], the next expert's as negatives."""
    entries = [
        {"source_model": str(p), "positive_prompts": PROMPTS[i]} for i, p in enumerate(experts)
    ]
    return {"base_model": str(base), "experts": entries, **settings}


def qwen2_models(root: Path, experts: int = 3) -> tuple[Path, list[Path]]:
    """A 2-layer Qwen2 (attention biases, tied embeddings) and ``experts`` experts of it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, dtype="float32",
    )  # fmt: skip
    torch.manual_seed(5)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.1)  # biases that must reach the output
    base = root / "qwen2-base"
    model.save_pretrained(base)
    word_tokenizer().save_pretrained(base)
    folders = []
    for i in range(experts):
        expert = Qwen2ForCausalLM.from_pretrained(base)
        g = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for name, p in expert.named_parameters():
                if ".mlp." in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        expert.save_pretrained(root / f"qwen2-e{i}")
        folders.append(root / f"qwen2-e{i}")
    return base, folders
