"""A model with a LoRA adapter applied as it is read (mergekit's MODEL+LORA).

The reference is PEFT itself: the adapter loaded onto the float32 model and merged
with ``merge_and_unload``, as mergekit does before it merges (equal within float32
rounding: the low-rank products are taken in float64), and the formulas written out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelfuse.checkpoint import open_checkpoint
from modelfuse.checkpoint.adapted import AdaptedCheckpoint, open_adapted
from modelfuse.errors import CheckpointError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.to(dtype).save_pretrained(folder)
    return folder


def _adapter(model_folder: Path, folder: Path, **settings) -> Path:
    """A PEFT LoRA adapter of the model, every factor random (PEFT starts B at zero)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    config = peft.LoraConfig(**settings)
    wrapped = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    wrapped.save_pretrained(folder)
    return folder


def _merged_by_peft(model_folder: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


SETTINGS = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    "patterns, rslora, embedding and a whole module": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "down_proj", "embed_tokens"],
        "rank_pattern": {"down_proj": 2},
        "alpha_pattern": {"layers.1.self_attn.q_proj": 5},
        "use_rslora": True,
        "modules_to_save": ["lm_head"],
    },
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_every_tensor_is_what_peft_merges(tmp_path, settings):
    model = _llama(tmp_path / "model")
    adapter = _adapter(model, tmp_path / "lora", **settings)
    expected = _merged_by_peft(model, adapter)
    with open_adapted(model, adapter) as ckpt:
        assert sorted(ckpt.keys()) == sorted(expected)
        changed = ckpt.updated()
        assert changed  # the adapter changes something, and exactly what PEFT changes
        with open_checkpoint(model) as plain:
            differs = sorted(k for k in expected if not torch.equal(plain.read(k), expected[k]))
        assert changed == differs
        for name, value in expected.items():
            assert ckpt.info(name).dtype == torch.float32
            whole = ckpt.read(name)
            torch.testing.assert_close(whole, value, rtol=1e-6, atol=1e-6, msg=name)
            if name not in changed:
                assert torch.equal(whole, value), name
            if value.dim() == 2:  # any block of rows is exactly those rows of the whole
                for start, stop in ((3, 13), (0, 1), (5, 16), (0, value.shape[0])):
                    assert torch.equal(ckpt.read_rows(name, start, stop), whole[start:stop]), name


def test_a_bfloat16_model_is_read_in_float32_as_mergekit_merges_it(tmp_path):
    model = _llama(tmp_path / "model", dtype=torch.bfloat16)
    adapter = _adapter(_llama(tmp_path / "f32"), tmp_path / "lora", **SETTINGS["plain"])
    expected = _merged_by_peft(model, adapter)  # mergekit loads the model in float32
    with open_adapted(model, adapter) as ckpt:
        for name, value in expected.items():
            assert ckpt.read(name).dtype == torch.float32
            torch.testing.assert_close(ckpt.read(name), value, rtol=1e-6, atol=1e-6, msg=name)
        name = "model.layers.0.self_attn.q_proj.weight"
        as_read = ckpt.read(name)
    with open_adapted(model, adapter, dtype=None) as ckpt:  # each tensor in its own dtype
        assert ckpt.read(name).dtype == torch.bfloat16
        assert torch.equal(ckpt.read(name), as_read.to(torch.bfloat16))


def _handmade(tmp_path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    """fc (3 x 4 weight and bias) and emb (5 x 2); an adapter folder written by hand."""
    model = tmp_path / "model"
    model.mkdir()
    weights = {
        "fc.weight": torch.arange(12.0).reshape(3, 4),
        "fc.bias": torch.ones(3),
        "emb.weight": torch.arange(10.0).reshape(5, 2),
    }
    save_file(weights, model / "model.safetensors")
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_file(tensors, adapter / "adapter_model.safetensors")
    return model, adapter


P = "base_model.model."


def test_the_formulas_written_out(tmp_path):
    a, b = torch.randn(2, 4), torch.randn(3, 2)
    bias = torch.randn(3)
    ea, eb = torch.randn(2, 5), torch.randn(2, 2)
    tensors = {
        P + "fc.lora_A.weight": a, P + "fc.lora_B.weight": b, P + "fc.lora_B.bias": bias,
        P + "emb.lora_embedding_A": ea, P + "emb.lora_embedding_B": eb,
    }
    model, adapter = _handmade(tmp_path, {"r": 2, "lora_alpha": 3, "lora_bias": True}, tensors)
    d = torch.float64  # the low-rank products in float64, rounded once
    with open_adapted(model, adapter) as ckpt:
        w = torch.arange(12.0).reshape(3, 4)
        assert torch.equal(ckpt.read("fc.weight"), (w.to(d) + (b.to(d) @ a.to(d)) * 1.5).float())
        assert torch.equal(ckpt.read("fc.bias"), torch.ones(3) + bias * 1.5)  # as PEFT: float32
        e = torch.arange(10.0).reshape(5, 2)
        expected = (e.to(d) + (eb.to(d) @ ea.to(d)).T * 1.5).float()
        assert torch.equal(ckpt.read("emb.weight"), expected)
        assert torch.equal(ckpt.read_rows("emb.weight", 1, 4), expected[1:4])


def test_fan_in_fan_out_transposes_the_product(tmp_path):
    a, b = torch.randn(1, 3), torch.randn(4, 1)  # the weight is stored (in, out) = (3, 4)
    tensors = {P + "fc.lora_A.weight": a, P + "fc.lora_B.weight": b}
    model, adapter = _handmade(tmp_path, {"r": 1, "lora_alpha": 1, "fan_in_fan_out": True}, tensors)
    with open_adapted(model, adapter) as ckpt:
        d = torch.float64
        expected = (torch.arange(12.0).reshape(3, 4).to(d) + (b.to(d) @ a.to(d)).T).float()
        assert torch.equal(ckpt.read("fc.weight"), expected)
        assert torch.equal(ckpt.read_rows("fc.weight", 1, 3), expected[1:3])


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"r": 1, "use_dora": True}, {}, "DoRA"),
        ({"peft_type": "IA3"}, {}, "peft_type 'IA3'"),
        ({"r": 1}, {P + "fc.lora_A.weight": torch.ones(1, 4)}, "has no 'base_model.model.fc.lora_B.weight'"),
        ({"r": 1}, {P + "fc.lora_B.weight": torch.ones(3, 1)}, "has no lora_A beside it"),
        ({"r": 1}, {P + "fc.lora_A.weight": torch.ones(1, 5), P + "fc.lora_B.weight": torch.ones(3, 1)},
         "do not fit fc.weight [3, 4]"),
        ({"r": 2}, {P + "fc.lora_A.weight": torch.ones(1, 4), P + "fc.lora_B.weight": torch.ones(3, 1)},
         "has rank 1 but the configuration says 2"),
        ({"r": 1}, {P + "gone.lora_A.weight": torch.ones(1, 4), P + "gone.lora_B.weight": torch.ones(3, 1)},
         "changes 'gone.weight', which"),
        ({"r": 1}, {P + "emb.weight": torch.ones(6, 2)}, "was the model's vocabulary resized?"),
        ({"r": 1}, {"fc.lora_A.weight": torch.ones(1, 4)}, "does not start with 'base_model.model.'"),
        ({"r": 0}, {}, "r: expected a positive number"),
        ({"r": 1, "lora_alpha": float("nan")}, {}, "lora_alpha: expected a positive number"),
        ({"r": 1, "rank_pattern": {"(": 1}}, {P + "fc.lora_A.weight": torch.ones(1, 4),
                                             P + "fc.lora_B.weight": torch.ones(3, 1)}, "is not a pattern"),
    ],
)
def test_adapters_it_cannot_apply_are_refused_in_one_line(tmp_path, config, tensors, message):
    model, adapter = _handmade(tmp_path, config, tensors or {P + "emb.weight": torch.ones(5, 2)})
    with pytest.raises(CheckpointError, match=None) as info:
        open_adapted(model, adapter)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_folder_without_an_adapter_is_refused(tmp_path):
    model, adapter = _handmade(tmp_path, {"r": 1}, {P + "emb.weight": torch.ones(5, 2)})
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        open_adapted(model, adapter)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        AdaptedCheckpoint(open_checkpoint(model), adapter)


@pytest.mark.parametrize("flag", [True, False], ids=["fan_in_fan_out", "flag left false"])
def test_gpt2_conv1d_adapters_are_transposed_as_peft_does(tmp_path, flag):
    # GPT-2 stores c_attn as Conv1D, weight (in, out); PEFT transposes its update even when
    # the adapter's configuration leaves fan_in_fan_out false (it warns and sets it)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "model")
    adapter = _adapter(tmp_path / "model", tmp_path / "lora", r=2, lora_alpha=4,
                       target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings["fan_in_fan_out"] = flag
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    expected = _merged_by_peft(tmp_path / "model", adapter)
    with open_adapted(tmp_path / "model", adapter) as ckpt:
        assert "transformer.h.0.attn.c_attn.weight" in ckpt.updated()
        for name in ckpt.updated():
            whole = ckpt.read(name)
            torch.testing.assert_close(whole, expected[name], rtol=1e-6, atol=1e-6, msg=name)
            assert torch.equal(ckpt.read_rows(name, 5, 20), whole[5:20]), name
