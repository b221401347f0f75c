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
from modelfuse.lora import extract_lora

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
    # what cannot be factored is stored whole, as mergekit-extract-lora does
    assert result.skipped == [] and result.full == ["model.embed_tokens", "model.norm"]
    assert any("model.norm" in note and "modules_to_save" in note for note in result.notes())

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 2
    assert config["rank_pattern"] == {} and sorted(config["target_modules"]) == sorted(modules)
    assert config["modules_to_save"] == ["model.embed_tokens", "model.norm"]
    assert config["task_type"] == "CAUSAL_LM" and config["lora_bias"] is False
    stored = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    whole = ["base_model.model.model.embed_tokens.weight", "base_model.model.model.norm.weight"]
    assert sorted(stored) == sorted(
        [f"base_model.model.{m}.lora_{x}.weight" for m in modules for x in "AB"] + whole
    )
    deltas = _deltas(base, tuned)
    for m in modules:
        product = stored[f"base_model.model.{m}.lora_B.weight"] @ stored[
            f"base_model.model.{m}.lora_A.weight"
        ]
        torch.testing.assert_close(product.double(), deltas[m + ".weight"], atol=2e-6, rtol=0)
    reference = LlamaForCausalLM.from_pretrained(tuned).eval()
    assert torch.equal(stored[whole[1]], reference.model.norm.weight)

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "lora")
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
    merged = model.merge_and_unload().eval()
    expected = dict(reference.named_parameters())
    for name, parameter in merged.named_parameters():
        torch.testing.assert_close(parameter, expected[name], atol=2e-6, rtol=0)


def _gpt2(folder: Path, seed: int, update: bool) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    if update:  # a rank-2 change of each attention's c_attn, stored (in, out) as Conv1D
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("c_attn.weight"):
                    p.add_(torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g) * 0.05)
    model.save_pretrained(folder)
    return folder


def test_gpt2_conv1d_layers_are_factored_as_peft_stores_them(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base, tuned = _gpt2(tmp_path / "base", 0, False), _gpt2(tmp_path / "tuned", 1, True)
    result = extract_lora(base, tuned, tmp_path / "lora", rank=2)
    assert sorted(result.modules) == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    assert result.max_error < 1e-5
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    stored = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    # Conv1D(in=32, out=96): lora_A is (r, in), lora_B (out, r), and B @ A is the weight's transpose
    a = stored["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = stored["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert tuple(a.shape) == (2, 32) and tuple(b.shape) == (96, 2)
    deltas = _deltas(base, tuned)
    torch.testing.assert_close(
        (b @ a).T.double(), deltas["transformer.h.0.attn.c_attn.weight"], atol=2e-6, rtol=0
    )
    merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), tmp_path / "lora")
    expected = dict(GPT2LMHeadModel.from_pretrained(tuned).named_parameters())
    for name, parameter in merged.merge_and_unload().named_parameters():
        torch.testing.assert_close(parameter, expected[name], atol=2e-6, rtol=0)


def test_module_filters_and_modules_saved_whole_as_mergekit_reads_them(llama, tmp_path: Path) -> None:
    base, tuned = llama
    result = extract_lora(
        base, tuned, tmp_path / "lora", rank=2,
        include=[r"self_attn\.[qv]_proj", "mlp"], exclude=[r"layers\.1\."], save_modules=["lm_head"],
    )
    expected = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "v_proj")]
    expected += [f"model.layers.0.mlp.{p}" for p in LINEAR[4:7]]
    assert sorted(result.modules) == sorted(expected)
    # lm_head whole as asked; the embedding whole as always (include does not leave it out)
    assert result.full == ["lm_head", "model.embed_tokens"] and result.requested == ["lm_head"]
    notes = " ".join(result.notes())
    assert "1 changed modules cannot be factored" in notes and ": model.embed_tokens" in notes
    assert "1 modules are stored whole as asked (--save-module), as PEFT modules_to_save: lm_head" in notes
    left_out = {n.rsplit(".", 1)[0] for n in result.skipped}
    assert "model.layers.0.self_attn.k_proj" in left_out and "model.layers.1.mlp.up_proj" in left_out
    assert "model.norm" in left_out  # a norm no include pattern finds
    stored = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert not [k for k in stored if "layers.1." in k or "k_proj" in k]
    with pytest.raises(ConfigError, match="leave out all"):
        extract_lora(base, tuned, tmp_path / "none", rank=2, include=["nothing-matches"])
    with pytest.raises(ConfigError, match="--include-regex: '\\[' is not a regular expression"):
        extract_lora(base, tuned, tmp_path / "bad", rank=2, include=["["])


def test_sv_epsilon_keeps_singular_values_above_it(two_layers, tmp_path: Path) -> None:
    base, tuned, _ = two_layers  # fc1's singular values 3, 2, 1; fc2's 4, 0.5, 0.25
    result = extract_lora(base, tuned, tmp_path / "lora", rank=3, sv_epsilon=1.5)
    assert result.modules["fc1"].rank == 2 and result.modules["fc2"].rank == 1
    with pytest.raises(ConfigError, match="--sv-epsilon"):
        extract_lora(base, tuned, tmp_path / "bad", rank=3, sv_epsilon=-1.0)


def test_embeddings_and_norms_can_be_left_out(llama, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, tuned = llama
    result = extract_lora(
        base, tuned, tmp_path / "lora", rank=2, embeddings="skip", skip_undecomposable=True
    )
    assert result.skipped == ["model.embed_tokens.weight", "model.norm.weight"] and not result.full
    assert any("model.norm.weight" in note for note in result.notes())
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None
    merged = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(base), tmp_path / "lora"
    ).merge_and_unload()
    original = dict(_llama(0).named_parameters())
    for name in ("model.embed_tokens.weight", "model.norm.weight"):  # the base's, unchanged
        torch.testing.assert_close(dict(merged.named_parameters())[name], original[name])


def test_embeddings_are_adapted_when_asked(llama, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, tuned = llama
    result = extract_lora(base, tuned, tmp_path / "lora", rank=2, embeddings="lora")
    assert result.modules["model.embed_tokens"].embedding
    assert result.skipped == [] and result.full == ["model.norm"]
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


@pytest.mark.parametrize(
    ("failure", "expected"),
    [(OSError(28, "No space left on device"), OutputError), (KeyboardInterrupt(), KeyboardInterrupt)],
)
def test_a_failed_or_interrupted_write_leaves_nothing(
    two_layers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure, expected
) -> None:
    import modelfuse.checkpoint.writer as writer_module

    base, tuned, _ = two_layers

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(writer_module, "_write_at", fail)
    with pytest.raises(expected):
        extract_lora(base, tuned, tmp_path / "lora", rank=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "tuned.safetensors"]


KILLED_EXTRACTION = """
import os, signal, sys
import modelfuse.checkpoint.writer as writer_module
from modelfuse.lora import extract_lora

real = writer_module._write_at
def write_then_die(*args):
    real(*args)
    os.kill(os.getpid(), signal.SIGKILL)
writer_module._write_at = write_then_die
extract_lora(sys.argv[1], sys.argv[2], sys.argv[3], rank=2)
"""


def test_a_killed_extraction_s_folder_is_removed_by_the_next_one(two_layers, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    base, tuned, _ = two_layers
    out = tmp_path / "lora"
    done = subprocess.run(
        [sys.executable, "-c", KILLED_EXTRACTION, str(base), str(tuned), str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".lora.tmp-")]
    result = extract_lora(base, tuned, out, rank=2)
    assert not left.exists() and any("removed" in note for note in result.notes())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "lora", "tuned.safetensors"]


def test_changed_biases_become_lora_bias_when_every_adapted_layer_has_one(
    two_layers, tmp_path: Path
) -> None:
    from peft import PeftModel

    base, tuned, deltas = two_layers
    state = load_file(tuned)
    bias_update = torch.tensor([0.5, -1.0, 0.0, 2.0])
    state["fc2.bias"] = state["fc2.bias"] + bias_update
    save_file(state, tmp_path / "biased.safetensors")
    out = tmp_path / "lora"
    result = extract_lora(base, tmp_path / "biased.safetensors", out, rank=3)
    assert result.lora_bias and not result.full and sorted(result.modules) == ["fc1", "fc2"]
    stored = load_file(out / "adapter_model.safetensors")
    torch.testing.assert_close(stored["base_model.model.fc2.lora_B.bias"], bias_update)
    assert torch.equal(stored["base_model.model.fc1.lora_B.bias"], torch.zeros(5))
    assert json.loads((out / "adapter_config.json").read_text())["lora_bias"] is True

    model = _TwoLayers()
    model.load_state_dict(load_file(base))
    reference = _TwoLayers()
    reference.load_state_dict(state)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(0))
    adapted = PeftModel.from_pretrained(model, out)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), reference(x), atol=1e-5, rtol=0)


def test_a_changed_bias_of_a_layer_peft_cannot_give_lora_bias_stores_the_layer_whole(
    tmp_path: Path,
) -> None:
    from peft import PeftModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4, bias=False))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    tuned = {k: v.clone() for k, v in state.items()}
    tuned["0.weight"] += _with_spectrum([1.0], 5, 6, 2)
    tuned["2.weight"] += _with_spectrum([2.0, 1.0], 4, 5, 3)
    tuned["0.bias"] += torch.randn(5, generator=generator)
    save_file(state, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    out = tmp_path / "lora"
    result = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", out, rank=2)
    # layer 2 has no bias, so PEFT's lora_bias cannot be used: layer 0 is stored whole
    assert not result.lora_bias and result.full == ["0"] and list(result.modules) == ["2"]
    stored = load_file(out / "adapter_model.safetensors")
    assert torch.equal(stored["base_model.model.0.bias"], tuned["0.bias"])
    assert torch.equal(stored["base_model.model.0.weight"], tuned["0.weight"])
    reference = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4, bias=False))
    reference.load_state_dict(tuned)
    model.load_state_dict(state)
    adapted = PeftModel.from_pretrained(model, out)
    x = torch.randn(3, 6, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), reference(x), atol=1e-5, rtol=0)


def test_a_grown_vocabulary_is_stored_whole_with_the_tokenizer(llama, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, _ = llama
    grown = LlamaForCausalLM.from_pretrained(base)
    grown.resize_token_embeddings(35)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        grown.model.embed_tokens.weight[32:] = torch.randn(3, 16, generator=generator)
        grown.lm_head.weight[32:] = torch.randn(3, 16, generator=generator)
        grown.model.layers[0].mlp.up_proj.weight += _rank2((24, 16), generator)
    grown.save_pretrained(tmp_path / "grown")
    (tmp_path / "grown" / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    out = tmp_path / "lora"
    result = extract_lora(base, tmp_path / "grown", out, rank=2)
    assert result.vocabulary == (32, 35)
    assert result.full == ["lm_head", "model.embed_tokens"]
    assert list(result.modules) == ["model.layers.0.mlp.up_proj"]
    assert any("resize_token_embeddings(35)" in note for note in result.notes())
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 32}'

    model = LlamaForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(35)
    adapted = PeftModel.from_pretrained(model, out).eval()
    ids = torch.tensor([[1, 33, 9, 34, 7, 32]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, grown.eval()(ids).logits, atol=1e-5, rtol=0)


def test_two_different_row_changes_are_not_a_vocabulary(two_layers, tmp_path: Path) -> None:
    base, tuned, _ = two_layers
    state = load_file(base)
    state["fc1.weight"] = torch.zeros(7, 6)
    state["fc2.weight"] = torch.zeros(3, 5)
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="fc1.weight has 5 rows in the base but 7"):
        extract_lora(base, tmp_path / "odd.safetensors", tmp_path / "lora", rank=2)
    assert not (tmp_path / "lora").exists()
