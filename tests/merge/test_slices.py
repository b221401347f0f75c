"""mergekit's ``slices:`` syntax: layer stacking and per-slice merges."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import modelfuse
from modelfuse.errors import ConfigError
from modelfuse.merge.slices import split_layer_name


def test_split_layer_name():
    assert split_layer_name("model.layers.12.mlp.up_proj.weight") == (
        "model.layers.{}.mlp.up_proj.weight",
        12,
    )
    assert split_layer_name("lm_head.weight") is None


def test_passthrough_stacks_layers_and_renumbers(llama_folders, tmp_path):
    from transformers import LlamaForCausalLM

    a, b = llama_folders[0], llama_folders[1]
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 2]}]},
        ],
        "dtype": "float32",
    }
    out = tmp_path / "stacked"
    result = modelfuse.merge(config, out)
    merged = load_file(out / "model.safetensors")
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(merged[q.format(0)], sa[q.format(0)])
    assert torch.equal(merged[q.format(1)], sa[q.format(1)])
    assert torch.equal(merged[q.format(2)], sb[q.format(1)])
    assert q.format(3) not in merged
    # Embeddings from the first slice's source, final norm and head from the last's.
    assert torch.equal(merged["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], sb["model.norm.weight"])
    assert torch.equal(merged["lm_head.weight"], sb["lm_head.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert any("num_hidden_layers 2 -> 3" in note for note in result.notes)
    model = LlamaForCausalLM.from_pretrained(out).eval()
    assert len(model.model.layers) == 3
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_slices_with_two_sources_and_a_gradient(llama_folders, tmp_path):
    a, b = llama_folders[0], llama_folders[1]
    config = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": str(a), "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.0]}},
                    {"model": str(b), "layer_range": [0, 2], "parameters": {"weight": [0.0, 1.0]}},
                ]
            }
        ],
    }
    modelfuse.merge(config, tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    name = "model.layers.{}.mlp.down_proj.weight"
    torch.testing.assert_close(merged[name.format(0)], sa[name.format(0)])  # t = 0
    torch.testing.assert_close(merged[name.format(1)], sb[name.format(1)])  # t = 1
    # Outside the layers, embeddings and head alike: t = 0, as mergekit 0.1.5 reads them.
    torch.testing.assert_close(merged["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    torch.testing.assert_close(merged["lm_head.weight"], sa["lm_head.weight"])
    torch.testing.assert_close(merged["model.norm.weight"], sa["model.norm.weight"])


def test_slice_sources_of_different_lengths(llama_folders, tmp_path):
    a, b = llama_folders[0], llama_folders[1]
    config = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": str(a), "layer_range": [0, 2]},
                    {"model": str(b), "layer_range": [0, 1]},
                ]
            }
        ],
    }
    with pytest.raises(ConfigError, match=r"slices\[0\]: every source must span the same"):
        modelfuse.merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layer_range_past_the_model(llama_folders, tmp_path):
    config = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(llama_folders[0]), "layer_range": [1, 3]}]}],
    }
    with pytest.raises(
        ConfigError, match=r"slices\[0\].sources\[0\]: layer_range \[1, 3\] is not within the model's 2 layers"
    ):
        modelfuse.merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_must_be_a_source(llama_folders, tmp_path):
    a, b, c = (str(f) for f in llama_folders)
    config = {
        "merge_method": "task_arithmetic",
        "base_model": c,
        "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]}],
    }
    with pytest.raises(ConfigError, match="base model .* is not among the slice's sources"):
        modelfuse.merge(config, tmp_path / "out")


def test_models_and_slices_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of 'models' and 'slices'"):
        modelfuse.merge({"merge_method": "linear"}, tmp_path / "out")
