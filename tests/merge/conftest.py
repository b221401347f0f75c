"""Tiny checkpoints written by the tests themselves (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    # Perturb every weight so that fine-tunes really differ from the base.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture
def llama_folders(tmp_path: Path) -> list[Path]:
    """Three Hugging Face Llama folders (base first), float32 safetensors."""
    folders = []
    for i in range(3):
        folder = tmp_path / f"llama{i}"
        tiny_llama(seed=i).save_pretrained(folder, safe_serialization=True)
        folders.append(folder)
    return folders


def random_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g).to(dtype),
        "model.layers.0.mlp.weight": torch.randn(4, 4, generator=g).to(dtype),
        "model.layers.1.mlp.weight": torch.randn(4, 4, generator=g).to(dtype),
        "model.norm.weight": torch.randn(4, generator=g).to(dtype),
        "position_ids": torch.arange(6),
    }
