"""extract_lora against known low-rank fine-tunes, PEFT's own loader and Eckart-Young."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modelfuse.errors import CheckpointError, ConfigError, OutputError
from modelfuse.lora import extract_lora, low_rank_factors

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=False,
    )


def _llama(seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config()).eval()


def _rank2(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    return 0.1 * torch.randn(shape[0], 2, generator=generator) @ torch.randn(
        2, shape[1], generator=generator
    )


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama and a fine-tune adding a rank-2 update to every 2-D weight (embeddings too)
    and changing one norm."""
    root = tmp_path_factory.mktemp("llama")
    base = _llama(0)
    base.save_pretrained(root / "base")
    tuned = _llama(0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in tuned.parameters():
            if parameter.dim() == 2:
                parameter += _rank2(parameter.shape, generator)
        tuned.model.norm.weight += 0.5
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def _deltas(base: Path, tuned: Path) -> dict[str, torch.Tensor]:
    a = load_file(base / "model.safetensors")
    b = load_file(tuned / "model.safetensors")
    return {n: b[n].double() - a[n].double() for n in b}


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_rank_2_reproduces_the_finetune_through_peft(llama, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, tuned = llama
    before = _bytes(base), _bytes(tuned)
    result = extract_lora(base, tuned, tmp_path / "lora", rank=2)
    assert (_bytes(base), _bytes(tuned)) == before  # inputs untouched

    modules = [f"model.layers.{i}.{s}.{p}" for i in range(2) for s, ps in
               (("self_attn", LINEAR[:4]), ("mlp", LINEAR[4:7])) for p in ps] + ["lm_head"]
    assert sorted(result.modules) == sorted(modules)
    assert {fit.rank for fit in result.modules.values()} == {2}
    assert result.max_error < 1e-5
    assert result.skipped == ["model.embed_tokens.weight", "model.norm.weight"]
    assert any("model.norm.weight" in note for note in result.notes())

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 2
    assert config["rank_pattern"] == {} and sorted(config["target_modules"]) == sorted(modules)
    assert config["task_type"] == "CAUSAL_LM"
    stored = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert sorted(stored) == sorted(
        f"base_model.model.{m}.lora_{x}.weight" for m in modules for x in "AB"
    )
    deltas = _deltas(base, tuned)
    for m in modules:
        product = stored[f"base_model.model.{m}.lora_B.weight"] @ stored[
            f"base_model.model.{m}.lora_A.weight"
        ]
        torch.testing.assert_close(product.double(), deltas[m + ".weight"], atol=2e-6, rtol=0)

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "lora")
    merged = model.merge_and_unload().eval()
    reference = LlamaForCausalLM.from_pretrained(tuned).eval()
    expected = dict(reference.named_parameters())
    for name, parameter in merged.named_parameters():
        if "embed_tokens" in name or name == "model.norm.weight":
            # left out of the adapter: the base's
            torch.testing.assert_close(parameter, dict(_llama(0).named_parameters())[name])
        else:
            torch.testing.assert_close(parameter, expected[name], atol=2e-6, rtol=0)
    # with the embeddings and norm of the fine-tune copied in, the logits match
    with torch.no_grad():
        merged.model.embed_tokens.weight.copy_(reference.model.embed_tokens.weight)
        merged.model.norm.weight.copy_(reference.model.norm.weight)
        ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_embeddings_are_adapted_when_asked(llama, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, tuned = llama
    result = extract_lora(base, tuned, tmp_path / "lora", rank=2, embeddings=True)
    assert result.modules["model.embed_tokens"].embedding
    assert result.skipped == ["model.norm.weight"]
    stored = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert stored["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (2, 32)
    assert stored["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (16, 2)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "lora")
    merged = model.merge_and_unload()
    reference = LlamaForCausalLM.from_pretrained(tuned)
    torch.testing.assert_close(
        merged.model.embed_tokens.weight, reference.model.embed_tokens.weight, atol=2e-6, rtol=0
    )


def test_lower_rank_error_is_eckart_young(llama, tmp_path: Path) -> None:
    base, tuned = llama
    result = extract_lora(base, tuned, tmp_path / "lora", rank=1)
    assert {fit.rank for fit in result.modules.values()} == {1}
    errors = []
    for name, delta in _deltas(base, tuned).items():
        module = name.removesuffix(".weight")
        if module not in result.modules:
            continue
        s = np.linalg.svd(delta.numpy(), compute_uv=False)
        expected = math.sqrt(float(np.sum(s[1:] ** 2))) / math.sqrt(float(np.sum(s**2)))
        assert result.modules[module].error == pytest.approx(expected, rel=1e-4)
        errors.append(expected)
    assert result.max_error == pytest.approx(max(errors), rel=1e-4)
    assert result.mean_error == pytest.approx(sum(errors) / len(errors), rel=1e-4)
    assert "relative error max" in result.summary()


def _with_spectrum(singular: list[float], rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular), generator=generator))
    return (u * torch.tensor(singular)) @ v.T


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def two_layers(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in _TwoLayers().state_dict().items()}
    # fc1: squares 9, 4, 1 of 14; fc2: squares 16, 0.25, 0.0625 of 16.3125
    deltas = {"fc1.weight": _with_spectrum([3.0, 2.0, 1.0], 5, 6, 1),
              "fc2.weight": _with_spectrum([4.0, 0.5, 0.25], 4, 5, 2)}
    save_file(state, tmp_path / "base.safetensors")
    save_file({k: v + deltas.get(k, 0) for k, v in state.items()}, tmp_path / "tuned.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", deltas


@pytest.mark.parametrize(
    ("energy", "rank", "expected"),
    [
        (0.6, None, {"fc1": 1, "fc2": 1}),  # 9/14 = 0.64; 16/16.31 = 0.98
        (0.9, None, {"fc1": 2, "fc2": 1}),  # 13/14 = 0.93
        (0.99, None, {"fc1": 3, "fc2": 2}),  # 16.25/16.31 = 0.996
        (0.999, None, {"fc1": 3, "fc2": 3}),
        (0.999, 2, {"fc1": 2, "fc2": 2}),  # capped by the rank
        (None, 5, {"fc1": 3, "fc2": 3}),  # never above the update's own rank
    ],
)
def test_energy_threshold_picks_the_hand_rank_and_peft_applies_rank_pattern(
    two_layers, tmp_path: Path, energy: float | None, rank: int | None, expected: dict[str, int]
) -> None:
    from peft import PeftModel

    base, tuned, deltas = two_layers
    out = tmp_path / "lora"
    result = extract_lora(base, tuned, out, rank=rank, energy=energy)
    assert {m: fit.rank for m, fit in result.modules.items()} == expected
    config = json.loads((out / "adapter_config.json").read_text())
    top = max(expected.values())
    assert config["r"] == top and config["lora_alpha"] == top
    pattern = {m: r for m, r in expected.items() if r != top}
    assert config["rank_pattern"] == pattern and config["alpha_pattern"] == pattern
    assert config["task_type"] is None

    model = _TwoLayers()
    model.load_state_dict(load_file(base))
    merged = PeftModel.from_pretrained(model, out).merge_and_unload()
    for m, k in expected.items():
        u, s, vh = torch.linalg.svd(deltas[f"{m}.weight"].double())
        truncated = (u[:, :k] * s[:k]) @ vh[:k]
        want = load_file(base)[f"{m}.weight"].double() + truncated
        torch.testing.assert_close(getattr(merged, m).weight.double(), want, atol=1e-5, rtol=0)
        dropped = math.sqrt(float((s[k:] ** 2).sum())) / math.sqrt(float((s**2).sum()))
        assert result.modules[m].error == pytest.approx(dropped, abs=1e-6)


def test_low_rank_factors_split_the_singular_values_evenly() -> None:
    delta = _with_spectrum([5.0, 1.0], 4, 3, 0)
    b, a = low_rank_factors(delta, rank=1)
    # B = u1 sqrt(s1), A = sqrt(s1) v1: both carry norm sqrt(5)
    assert float(b.norm()) == pytest.approx(math.sqrt(5.0), rel=1e-5)
    assert float(a.norm()) == pytest.approx(math.sqrt(5.0), rel=1e-5)
    before = delta.clone()
    low_rank_factors(delta, energy=0.5)
    assert torch.equal(delta, before)


def test_same_model_twice_is_refused(two_layers, tmp_path: Path) -> None:
    base, _, _ = two_layers
    with pytest.raises(CheckpointError, match="task vector is zero"):
        extract_lora(base, base, tmp_path / "lora", rank=2)
    assert not (tmp_path / "lora").exists()


def test_unchanged_modules_are_left_out_and_named(two_layers, tmp_path: Path) -> None:
    base, tuned, _ = two_layers
    state = load_file(tuned)
    state["fc2.weight"] = load_file(base)["fc2.weight"]
    save_file(state, tmp_path / "half.safetensors")
    result = extract_lora(base, tmp_path / "half.safetensors", tmp_path / "lora", rank=2)
    assert list(result.modules) == ["fc1"] and result.unchanged == ["fc2"]
    assert any("fc2" in note for note in result.notes())


def test_different_shapes_and_architectures_are_refused(two_layers, tmp_path: Path) -> None:
    base, tuned, _ = two_layers
    other = {"fc1.weight": torch.zeros(5, 7), "fc1.bias": torch.zeros(5),
             "fc2.weight": torch.zeros(4, 5), "fc2.bias": torch.zeros(4)}
    save_file(other, tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match=r"fc1.weight has shape \[5, 6\] in the base"):
        extract_lora(base, tmp_path / "wide.safetensors", tmp_path / "lora", rank=2)
    save_file({"proj.weight": torch.zeros(4, 5)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="proj.weight is in the fine-tuned checkpoint but not"):
        extract_lora(base, tmp_path / "other.safetensors", tmp_path / "lora", rank=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "base.safetensors", "other.safetensors", "tuned.safetensors", "wide.safetensors"
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "--rank 16 or --energy 0.9"),
        ({"rank": 0}, "--rank: expected a whole number of at least 1, got 0"),
        ({"rank": 1.5}, "--rank: expected a whole number"),
        ({"energy": 0.0}, r"--energy: expected a fraction in \(0, 1\], got 0.0"),
        ({"energy": 1.5}, r"--energy: expected a fraction"),
    ],
)
def test_bad_rank_or_energy(two_layers, tmp_path: Path, kwargs: dict, match: str) -> None:
    base, tuned, _ = two_layers
    with pytest.raises(ConfigError, match=match):
        extract_lora(base, tuned, tmp_path / "lora", **kwargs)
    assert not (tmp_path / "lora").exists()


def test_output_never_an_input_and_overwrite(two_layers, tmp_path: Path) -> None:
    base, tuned, _ = two_layers
    before = base.read_bytes()
    with pytest.raises(OutputError, match="is the base checkpoint"):
        extract_lora(base, tuned, base, rank=2, overwrite=True)
    with pytest.raises(OutputError, match="contains the base checkpoint"):
        extract_lora(base, tuned, tmp_path, rank=2, overwrite=True)
    assert base.read_bytes() == before
    out = tmp_path / "lora"
    extract_lora(base, tuned, out, rank=1)
    with pytest.raises(OutputError, match="already exists"):
        extract_lora(base, tuned, out, rank=2)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 1
    extract_lora(base, tuned, out, rank=2, overwrite=True)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "lora", "tuned.safetensors"]


def test_non_finite_weights_are_refused(two_layers, tmp_path: Path) -> None:
    base, tuned, _ = two_layers
    state = load_file(tuned)
    state["fc2.weight"][0, 0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="fc2.weight: the difference .* NaN or inf"):
        extract_lora(base, tmp_path / "nan.safetensors", tmp_path / "lora", rank=2)
    assert not (tmp_path / "lora").exists()


def test_large_modules_use_a_randomized_svd_that_still_finds_an_exact_low_rank_update(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import modelfuse.lora.extract as extract

    calls = []
    real = torch.svd_lowrank

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "_LOWRANK_SIDE", 40)
    monkeypatch.setattr(torch, "svd_lowrank", counted)
    delta = _with_spectrum([5.0, 3.0, 2.0], 60, 48, 3)
    b, a = low_rank_factors(delta, rank=3)
    assert calls == [(60, 48)]
    torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=0)
    b, a = low_rank_factors(delta, energy=0.99)  # an energy threshold needs the whole spectrum
    assert calls == [(60, 48)] and a.shape[0] == 3


@pytest.mark.parametrize(
    ("failure", "expected"),
    [(OSError(28, "No space left on device"), OutputError), (KeyboardInterrupt(), KeyboardInterrupt)],
)
def test_a_failed_or_interrupted_write_leaves_nothing(
    two_layers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure, expected
) -> None:
    import safetensors.torch

    base, tuned, _ = two_layers

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(expected):
        extract_lora(base, tuned, tmp_path / "lora", rank=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "tuned.safetensors"]
