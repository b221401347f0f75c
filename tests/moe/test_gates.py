"""Router rows against formulas written out here: hidden states, cheap embeddings, random draws."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from modelfuse.errors import ConfigError
from modelfuse.moe import GATE_MODES, cheap_embedding_vector, hidden_state_vector, random_gates
from modelfuse.moe.gates import (
    gate_vectors,
    get_gate_mode,
    normalized,
    prepare_tokenizer,
    prompt_batches,
)

from ._tiny import PROMPTS, base_llama


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return base_llama(tmp_path_factory.mktemp("gates") / "base")


@pytest.fixture(scope="module")
def model_and_tokenizer(base):
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    return model, prepare_tokenizer(AutoTokenizer.from_pretrained(base))


def _reference_states(model, tokenizer, prompts):
    """transformers' own hidden states: (layers, prompts, positions, hidden), left-padded batch."""
    tokenizer.padding_side = "left"
    batch = tokenizer(
        ["<s>" + p for p in prompts], padding=True, add_special_tokens=False, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return torch.stack(out.hidden_states[:-1])  # the input of every layer; [-1] is after the norm


def test_hidden_is_the_last_token_averaged_over_prompts(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = PROMPTS[0] + ["w5"]  # different lengths: the batch is padded on the left
    states = _reference_states(model, tokenizer, prompts)
    expected = states[:, :, -1, :].sum(dim=1) / len(prompts)  # mergekit's bfloat16 arithmetic
    got = hidden_state_vector(model, tokenizer, prompts, reduce="last")
    assert got.shape == (2, 32) and got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    # the same in float32 arithmetic, as a plain mean, agrees to bfloat16's rounding
    plain = torch.stack([states[:, i, -1, :].float() for i in range(len(prompts))]).mean(0)
    assert torch.allclose(got.float(), plain, rtol=2e-2, atol=2e-2)


def test_hidden_avg_averages_every_position_then_the_prompts(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = PROMPTS[1]
    states = _reference_states(model, tokenizer, prompts)
    per_prompt = states.sum(dim=2) / states.shape[2]  # pad positions included, as mergekit does
    expected = per_prompt.sum(dim=1) / len(prompts)
    got = hidden_state_vector(model, tokenizer, prompts, reduce="mean")
    assert torch.equal(got, expected)
    last = hidden_state_vector(model, tokenizer, prompts, reduce="last")
    assert not torch.allclose(got, last)


def test_batches_of_bounded_size_give_the_same_rows(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = PROMPTS[2] + PROMPTS[3] + ["w1 w2 w3 w4 w5"]
    whole = hidden_state_vector(model, tokenizer, prompts)
    pieces = hidden_state_vector(model, tokenizer, prompts, max_tokens=7)  # 1-2 prompts a pass
    # RoPE attention depends on relative positions only: left padding changes rounding alone
    assert torch.allclose(whole.float(), pieces.float(), rtol=3e-2, atol=3e-2)
    with pytest.raises(ConfigError, match="a prompt of 6 tokens is longer than the 5 tokens"):
        hidden_state_vector(model, tokenizer, prompts, max_tokens=5, what="x")


def test_model_training_flag_is_restored(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()
    try:
        hidden_state_vector(model, tokenizer, ["w1"])
        assert model.training
    finally:
        model.eval()


def test_cheap_embed_is_the_unit_sum_of_the_unpadded_token_rows():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(20, 6, generator=g)
    ids = torch.tensor([[1, 1, 5, 7], [1, 3, 3, 9]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    total = torch.zeros(6)
    for row in range(2):
        for col in range(4):
            if mask[row, col]:
                total += table[ids[row, col]]
    expected = total / total.norm()
    got = cheap_embedding_vector(lambda i: table[i], {"input_ids": ids, "attention_mask": mask}, 3)
    assert got.shape == (3, 6)
    for layer in range(3):
        assert torch.allclose(got[layer], expected, atol=1e-6)


def test_random_draws_follow_the_seed_and_the_scale():
    g = torch.Generator().manual_seed(7)
    normal = random_gates(2, 3, 16, generator=g)
    assert torch.equal(normal, torch.randn((2, 3, 16), generator=torch.Generator().manual_seed(7)))
    g = torch.Generator().manual_seed(7)
    uniform = random_gates(2, 3, 16, generator=g, uniform=True)
    draws = torch.rand((2, 3, 16), generator=torch.Generator().manual_seed(7))
    assert torch.allclose(uniform, draws * 2 * 0.25 - 0.25)  # 1 / sqrt(16) = 0.25
    assert float(uniform.abs().max()) <= 0.25


def test_negative_prompts_are_subtracted_before_the_normalisation():
    table = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([[3.0, 0.0]])}
    rows = gate_vectors(
        [("experts[0]", ["a"], None), ("experts[1]", ["a"], ["b"])],
        lambda prompts, what: table[prompts[0]].clone(),
    )
    assert torch.allclose(rows[0, 0], torch.tensor([0.6, 0.8]))
    assert torch.allclose(rows[0, 1], torch.tensor([0.0, 1.0]))  # (0, 4) / 4
    assert torch.equal(normalized(torch.zeros(1, 2)), torch.zeros(1, 2))  # norm clamped at 1e-8


def test_gate_modes_are_mergekit_s():
    assert set(GATE_MODES) == {
        "hidden",
        "hidden_last",
        "hidden_avg",
        "cheap_embed",
        "random",
        "uniform_random",
    }
    assert GATE_MODES["hidden"].reduce == "last" and GATE_MODES["hidden_avg"].reduce == "mean"
    assert not GATE_MODES["random"].needs_prompts and GATE_MODES["cheap_embed"].needs_prompts
    with pytest.raises(ConfigError, match="valid: hidden, hidden_last"):
        get_gate_mode("hiden")


def test_cheap_embed_in_bounded_batches_is_the_same_sum(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    prompts = ["w1 w2 w3 w4 w5 w6", "w7", "w8 w9"]
    whole = prompt_batches(tokenizer, prompts)
    pieces = prompt_batches(tokenizer, prompts, max_tokens=7)  # the long prompt runs alone
    assert len(whole) == 1 and [b["input_ids"].shape for b in pieces] == [(1, 7), (2, 3)]
    table = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    one = cheap_embedding_vector(lambda ids: table[ids], whole[0], 2)
    split = cheap_embedding_vector(lambda ids: table[ids], pieces, 2)
    assert torch.allclose(one, split, atol=1e-6)
    tokens = [1, 3 + 1, 3 + 2, 3 + 3, 3 + 4, 3 + 5, 3 + 6, 1, 3 + 7, 1, 3 + 8, 3 + 9]  # BOS + words
    expected = table[tokens].sum(dim=0)
    assert torch.allclose(one[0], expected / expected.norm(), atol=1e-6)
