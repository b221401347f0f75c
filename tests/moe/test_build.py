"""build_moe end to end on tiny Llamas: the output loads and runs, tensors come from the right
model, and the routers are the formulas written out here."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from modelfuse.moe import CONFIG_COPY, build_moe, plan_moe

from ._tiny import PROMPTS, build_models, moe_config, qwen2_models

LAYERS = 2
PROJECTIONS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    base, experts = build_models(root, 4)
    return root, base, experts


def _build(inputs, name, **settings):
    root, base, experts = inputs
    options = settings.pop("options", {})
    out = root / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nearly dependent routers of a tiny random model
        result = build_moe(moe_config(base, experts, **settings), out, **options)
    return result, out


@pytest.fixture(scope="module")
def hidden(inputs):
    return _build(inputs, "hidden", experts_per_token=2)


def _tensors(folder):
    return load_file(folder / "model.safetensors")


def test_the_mixtral_loads_tokenizes_and_generates(hidden):
    result, out = hidden
    assert result.architecture == "Mixtral" and result.experts == 4 and result.gate_mode == "hidden"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer("<s>w10 w11", add_special_tokens=False, return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    copied = yaml.safe_load((out / CONFIG_COPY).read_text())
    assert copied["base_model"] == str(out.parent / "base")  # the paths made absolute
    assert copied["experts"][3]["positive_prompts"] == PROMPTS[3]


def test_expert_mlps_are_the_experts_bytes_and_the_rest_is_the_base(inputs, hidden):
    _, base, experts = inputs
    _, out = hidden
    written = _tensors(out)
    base_tensors = _tensors(base)
    for e, folder in enumerate(experts):
        source = _tensors(folder)
        for layer in range(LAYERS):
            for projection, w in PROJECTIONS.items():
                got = written[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]
                want = source[f"model.layers.{layer}.mlp.{projection}.weight"]
                assert got.dtype == want.dtype and torch.equal(got, want)
                if e == 0:  # the experts really differ from the base
                    assert not torch.equal(
                        want, base_tensors[f"model.layers.{layer}.mlp.{projection}.weight"]
                    )
    outside = {n: t for n, t in base_tensors.items() if ".mlp." not in n}
    for name, tensor in outside.items():
        assert torch.equal(written[name], tensor), name
    routers = [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(LAYERS)]
    expert_names = {n for n in written if ".experts." in n}
    assert set(written) == set(outside) | expert_names | set(routers)


def _reference_hidden_gates(base, prompt_sets, average=False):
    """mergekit 0.1.5's hidden gate, written out: the base in bfloat16, left-padded batch with
    BOS-prefixed prompts, each layer's input at the last position (``average``: the mean over
    the positions, pads included), mean over the prompts, L2."""
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    rows = []
    for prompts in prompt_sets:
        batch = tokenizer(
            ["<s>" + p for p in prompts],
            padding=True,
            add_special_tokens=False,
            return_tensors="pt",
        )
        with torch.no_grad():
            states = model(**batch, output_hidden_states=True).hidden_states[:-1]
        if average:
            per_prompt = [h.sum(dim=1) / h.shape[1] for h in states]
        else:
            per_prompt = [h[:, -1, :] for h in states]
        vector = torch.stack(per_prompt).sum(dim=1) / len(prompts)
        rows.append(vector / vector.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)  # (layers, experts, hidden)


def test_hidden_routers_equal_the_reference(inputs, hidden):
    _, base, _ = inputs
    _, out = hidden
    expected = _reference_hidden_gates(base, [PROMPTS[i] for i in range(4)])
    written = _tensors(out)
    for layer in range(LAYERS):
        router = written[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert router.dtype == torch.float32  # the base's dtype; the rows were bfloat16
        assert torch.equal(router, expected[layer].float())


def test_hidden_avg_routers_average_over_the_tokens(inputs):
    _, base, _ = inputs
    result, out = _build(inputs, "hidden-avg", gate_mode="hidden_avg")
    expected = _reference_hidden_gates(base, [PROMPTS[i] for i in range(4)], average=True)
    router = _tensors(out)["model.layers.1.block_sparse_moe.gate.weight"]
    assert torch.equal(router, expected[1].float())
    last = _reference_hidden_gates(base, [PROMPTS[i] for i in range(4)])
    assert not torch.allclose(router, last[1].float(), atol=1e-2)  # not the last-token rows


def test_the_router_sends_each_expert_s_prompts_to_it(hidden):
    _, out = hidden
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    for expert, prompts in PROMPTS.items():
        for prompt in prompts:
            batch = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                logits = model(**batch, output_router_logits=True).router_logits
            for layer, per_token in enumerate(logits):  # (tokens, experts)
                assert int(per_token.mean(dim=0).argmax()) == expert, (prompt, layer)


def test_cheap_embed_and_negative_prompts_are_the_formula(inputs):
    root, base, experts = inputs
    result, out = _build(inputs, "cheap", gate_mode="cheap_embed", experts_per_token=1)
    assert result.gate_mode == "cheap_embed"
    table = _tensors(base)["model.embed_tokens.weight"]
    tokenizer = AutoTokenizer.from_pretrained(base)

    def direction(prompts):
        total = torch.zeros(table.shape[1])
        for prompt in prompts:  # BOS text + prompt; the padding is masked out
            for token in tokenizer("<s>" + prompt, add_special_tokens=False)["input_ids"]:
                total += table[token]
        return total / total.norm().clamp(min=1e-8)

    written = _tensors(out)
    for layer in range(LAYERS):  # the same rows for every layer
        router = written[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        for e in range(4):
            assert torch.allclose(router[e], direction(PROMPTS[e]), atol=1e-6)
    config = moe_config(base, experts, gate_mode="cheap_embed")
    config["experts"][1]["negative_prompts"] = PROMPTS[0]
    negative = build_moe(config, root / "cheap-negative")
    router = _tensors(negative.out)["model.layers.1.block_sparse_moe.gate.weight"]
    expected = direction(PROMPTS[1]) - direction(PROMPTS[0])
    assert torch.allclose(router[1], expected / expected.norm(), atol=1e-6)
    assert torch.allclose(router[0], direction(PROMPTS[0]), atol=1e-6)


def test_random_gates_use_the_seed(inputs):
    result, out = _build(inputs, "random", gate_mode="random", options={"random_seed": 3})
    draws = torch.randn((LAYERS, 4, 32), generator=torch.Generator().manual_seed(3))
    written = _tensors(out)
    for layer in range(LAYERS):
        assert torch.equal(
            written[f"model.layers.{layer}.block_sparse_moe.gate.weight"], draws[layer]
        )
    _, uniform = _build(inputs, "uniform", gate_mode="uniform_random", options={"random_seed": 3})
    rows = _tensors(uniform)["model.layers.0.block_sparse_moe.gate.weight"]
    scale = (1 / 32) ** 0.5
    draws = torch.rand((LAYERS, 4, 32), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(rows, draws[0] * 2 * scale - scale)


def test_dtype_noise_and_residual_scale(inputs):
    _, base, experts = inputs
    config = moe_config(base, experts, gate_mode="random", dtype="bfloat16")
    config["experts"][0]["residual_scale"] = 0.5
    config["experts"][1]["noise_scale"] = 0.01
    result = build_moe(config, inputs[0] / "scaled", random_seed=1)
    written = _tensors(result.out)
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((result.out / "config.json").read_text())["dtype"] == "bfloat16"
    down = _tensors(experts[0])["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(
        written["model.layers.0.block_sparse_moe.experts.0.w2.weight"],
        (down * 0.5).to(torch.bfloat16),
    )
    up = _tensors(experts[1])["model.layers.0.mlp.up_proj.weight"]
    noisy = written["model.layers.0.block_sparse_moe.experts.1.w3.weight"].float()
    assert 0.005 < float((noisy - up).std()) < 0.02  # noise of scale 0.01 on top
    again = build_moe(config, inputs[0] / "scaled", random_seed=1, overwrite=True)
    assert torch.equal(
        _tensors(again.out)["model.layers.0.block_sparse_moe.experts.1.w3.weight"],
        written["model.layers.0.block_sparse_moe.experts.1.w3.weight"],
    )


def test_qwen2_moe_with_a_shared_expert_loads_and_runs(inputs):
    _, base, experts = inputs
    config = moe_config(base, experts[:2], gate_mode="hidden")
    config["shared_experts"] = [{"source_model": str(experts[2]), "positive_prompts": ["w1 w2"]}]
    result = build_moe(config, inputs[0] / "qwen")
    assert result.architecture == "Qwen MoE" and result.shared_experts == 1
    model, info = AutoModelForCausalLM.from_pretrained(result.out, output_loading_info=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and not any(info.values()), info
    tokenizer = AutoTokenizer.from_pretrained(result.out)
    batch = tokenizer("<s>w40 w41", add_special_tokens=False, return_tensors="pt")
    assert model.generate(**batch, max_new_tokens=3, do_sample=False).shape == (1, 6)
    written = _tensors(result.out)
    shared = _tensors(experts[2])
    for projection in PROJECTIONS:
        assert torch.equal(
            written[f"model.layers.1.mlp.shared_expert.{projection}.weight"],
            shared[f"model.layers.1.mlp.{projection}.weight"],
        )
        assert torch.equal(
            written[f"model.layers.1.mlp.experts.1.{projection}.weight"],
            _tensors(experts[1])[f"model.layers.1.mlp.{projection}.weight"],
        )
    assert torch.equal(written["model.layers.0.self_attn.k_proj.bias"], torch.zeros(16))
    expected = _reference_hidden_gates(base, [PROMPTS[0], PROMPTS[1], ["w1 w2"]])
    assert torch.equal(written["model.layers.1.mlp.gate.weight"], expected[1, :2].float())
    assert torch.equal(
        written["model.layers.1.mlp.shared_expert_gate.weight"], expected[1, 2:].float()
    )


def test_the_plan_counts_every_step(inputs):
    _, base, experts = inputs
    plan = plan_moe(moe_config(base, experts))
    # 2 layers x (4 attention + 2 norms) + embedding, norm, head; 4 experts x 3 MLP x 2 layers;
    # 2 routers; and one step per expert's prompts
    assert len(plan.tensors) == 15 + 24 + 2 and plan.steps == 41 + 4


def test_a_qwen2_base_keeps_its_attention_biases_and_tied_head(tmp_path):
    base, experts = qwen2_models(tmp_path)
    config = moe_config(base, experts[:2], gate_mode="cheap_embed")
    config["shared_experts"] = [{"source_model": str(experts[2]), "positive_prompts": ["w1"]}]
    with pytest.warns(UserWarning, match="nearly dependent"):  # every row holds BOS's embedding
        result = build_moe(config, tmp_path / "out")
    assert result.architecture == "Qwen MoE"
    written = _tensors(result.out)
    source = _tensors(base)
    for name in ("model.layers.1.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias"):
        assert torch.equal(written[name], source[name]) and bool(source[name].abs().sum() > 0)
    assert "lm_head.weight" not in written  # tied to the embedding, as in the base
    model, info = AutoModelForCausalLM.from_pretrained(result.out, output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.tie_word_embeddings
    ids = torch.tensor([[1, 13, 14]])
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_mergekit_s_warnings_power_of_two_and_dependent_rows():
    from modelfuse.moe.build import _warn_about

    orthonormal = torch.eye(4, 8).expand(2, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_about(orthonormal, 4)  # condition number 1: nothing to say
    close = orthonormal.clone()
    close[1, 1] = close[1, 0] + 0.01 * close[1, 1]  # layer 1: two rows almost the same
    with pytest.warns(UserWarning, match=r"router rows of layers 1 are nearly dependent"):
        _warn_about(close, 4)
    with pytest.warns(UserWarning, match="3 experts, not a power of two"):
        _warn_about(orthonormal[:, :3], 3)


def test_without_transformers_the_refusal_says_what_to_install(inputs, monkeypatch):
    import builtins

    _, base, experts = inputs
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name.split(".")[0] == "transformers":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    from modelfuse.errors import ConfigError

    out = inputs[0] / "never"
    with pytest.raises(ConfigError, match=r"pip install 'modelfuse\[hf\]'"):
        build_moe(moe_config(base, experts, gate_mode="random"), out)
    assert not out.exists()
