"""The mergekit-moe configuration and the choice of output layout, without any model."""

from __future__ import annotations

import pytest

from modelfuse.errors import ConfigError
from modelfuse.moe import ARCHITECTURES, load_moe_config
from modelfuse.moe.architectures import select_architecture

LLAMAS = {
    "base_model": "llama",
    "experts[0].source_model": "llama",
    "experts[1].source_model": "llama",
}


def config(**changes):
    data = {
        "base_model": "b",
        "experts": [
            {"source_model": "x", "positive_prompts": ["a"]},
            {"source_model": "y", "positive_prompts": ["b"]},
        ],
    }
    data.update(changes)
    return load_moe_config(data)[0]


def test_mergekit_s_keys_and_defaults(tmp_path):
    path = tmp_path / "moe.yaml"
    path.write_text(
        "base_model: ./b\ngate_mode: cheap_embed\ndtype: torch.float16\nexperts_per_token: 1\n"
        "experts:\n  - source_model: ./x\n    positive_prompts: [a]\n    negative_prompts: [b]\n"
        "    noise_scale: 1e-2\n    residual_scale: 0.5\n"
    )
    cfg, folder = load_moe_config(path)
    assert folder == tmp_path.resolve()
    assert (cfg.gate_mode, cfg.dtype, cfg.experts_per_token) == ("cheap_embed", "torch.float16", 1)
    expert = cfg.experts[0]
    assert (expert.noise_scale, expert.residual_scale) == (0.01, 0.5)  # 1e-2 is a number
    defaults = config()
    assert (defaults.gate_mode, defaults.experts_per_token, defaults.shared_experts) == (
        "hidden",
        2,
        None,
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"gate_mod": "random"}, "gate_mod: unknown key (got 'random'); valid keys: base_model"),
        ({"experts": [{"source_model": "x", "prompts": ["a"]}]}, "experts.0.prompts: unknown key"),
        ({"experts": []}, "experts: List should have at least 1 item"),
        ({"dtype": "int64"}, "unknown dtype 'int64'"),
        ({"tokenizer_source": "model:./x"}, "tokenizer_source: 'model:./x' is not supported"),
        ({"merge_method": "linear"}, "merge_method: unknown key"),
        ({"experts_per_token": True}, "experts_per_token: True is not a number"),
        ({"experts_per_token": 1.5}, "experts_per_token: Input should be a valid integer"),
        (
            {"experts": [{"source_model": "x", "residual_scale": False}]},
            "experts.0.residual_scale: False is not a number",
        ),
    ],
)
def test_refusals_name_the_key(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(**changes)


def test_a_merge_configuration_points_to_modelfuse_merge():
    with pytest.raises(ConfigError, match="run it with modelfuse merge CONFIG OUT"):
        load_moe_config({"merge_method": "linear", "models": ["a", "b"]})


def test_tokenizer_from_the_base_is_accepted():
    assert config(tokenizer_source="base").tokenizer_source == "base"
    assert config(tokenizer={"source": "base"}).tokenizer == {"source": "base"}


def test_the_layout_mergekit_would_choose():
    assert select_architecture(config(), LLAMAS, needs_prompts=True) is ARCHITECTURES["mixtral"]
    assert (
        select_architecture(config(architecture="mix"), LLAMAS, needs_prompts=True).name
        == "mixtral"
    )
    shared = [{"source_model": "z", "positive_prompts": ["c"]}]
    three = {**LLAMAS, "shared_experts[0].source_model": "llama"}
    chosen = select_architecture(config(shared_experts=shared), three, needs_prompts=True)
    assert chosen is ARCHITECTURES["qwen"]
    # a shared expert without prompts: mergekit picks DeepSeek MoE unless told qwen (random gates)
    bare = [{"source_model": "z"}]
    with pytest.raises(ConfigError, match="DeepSeek MoE"):
        select_architecture(config(shared_experts=bare), three, needs_prompts=False)
    told = config(shared_experts=bare, architecture="qwen", gate_mode="random")
    assert select_architecture(told, three, needs_prompts=False).name == "qwen"
    with pytest.raises(ConfigError, match="Qwen MoE needs positive_prompts for the shared expert"):
        select_architecture(
            config(shared_experts=bare, architecture="qwen"), three, needs_prompts=True
        )
    qwen2 = dict.fromkeys(LLAMAS, "qwen2")
    with pytest.raises(ConfigError, match="Mixtral takes llama or mistral models, not 'qwen2'"):
        select_architecture(config(), qwen2, needs_prompts=True)
    with pytest.raises(ConfigError, match="selects mergekit's Qwen3 MoE"):
        select_architecture(
            config(architecture="qwen3"), dict.fromkeys(LLAMAS, "qwen3"), needs_prompts=True
        )
    mixed = {**LLAMAS, "experts[1].source_model": "mistral"}
    with pytest.raises(ConfigError, match=r"experts\[1\].source_model is 'mistral'"):
        select_architecture(config(), mixed, needs_prompts=True)
