"""``modelfuse moe`` through the command line: the output, the options, and every bad input as
one line with exit code 2 and nothing written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from modelfuse.cli import main

from ..moe._tiny import PROMPTS, base_llama, expert_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """base, e0, e1 (experts of base), wide (another MLP width), mistral (another model_type),
    bare (base without tokenizer files)."""
    root = tmp_path_factory.mktemp("cli-moe")
    base = base_llama(root / "base")
    expert_llama(root / "e0", base, seed=1)
    expert_llama(root / "e1", base, seed=2)
    base_llama(root / "wide", seed=3, intermediate_size=48)
    expert_llama(root / "mistral", base, seed=4, model_type="mistral")
    base_llama(root / "bare", tokenizer=False)
    crafted = {  # config.json files that do not fit their weights
        "heads": {"num_attention_heads": 5, "num_key_value_heads": 5},  # transformers refuses
        "deep": {"num_hidden_layers": 10**9},
        "wide-claim": {"hidden_size": 10**12},
    }
    for name, changes in crafted.items():
        shutil.copytree(base, root / name)
        config = json.loads((root / name / "config.json").read_text())
        config.update(changes)
        (root / name / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture
def work(models: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(models)
    for stale in ("out", "moe.yaml"):
        path = models / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return models


def write_config(folder: Path, **changes: object) -> str:
    config: dict[str, object] = {
        "base_model": "./base",
        "gate_mode": "hidden",
        "experts": [
            {"source_model": "./e0", "positive_prompts": PROMPTS[0]},
            {"source_model": "./e1", "positive_prompts": PROMPTS[1]},
        ],
    }
    config.update(changes)
    (folder / "moe.yaml").write_text(yaml.safe_dump(config))
    return "moe.yaml"


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(args: list[str], capsys: pytest.CaptureFixture[str], folder: Path) -> str:
    before, names = _snapshot(folder), sorted(os.listdir(folder))
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("modelfuse: error: "), err
    assert sorted(os.listdir(folder)) == names and _snapshot(folder) == before
    return err


def test_writes_a_mixtral_with_the_summary_line(work, capsys) -> None:
    assert main(["moe", write_config(work), "out", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(
        "wrote a Mixtral mixture of 2 experts (2 per token; hidden gates)"
    )
    assert captured.out.count("\n") == 1 and "moe" not in captured.err  # no bar with --quiet
    files = sorted(os.listdir(work / "out"))
    assert files == [
        "config.json",
        "generation_config.json",
        "mergekit_moe_config.yml",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # -o is the same output; the seed flag has mergekit's name and the convention's
    assert (
        main(
            [
                "moe",
                "moe.yaml",
                "-o",
                "out",
                "--overwrite",
                "--seed",
                "1",
                "--no-copy-tokenizer",
                "--no-write-model-card",
            ]
        )
        == 0
    )
    assert sorted(os.listdir(work / "out")) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_small_shards_and_a_progress_bar(work, capsys) -> None:
    assert (
        main(["moe", write_config(work, gate_mode="random"), "out", "--out-shard-size", "5K"]) == 0
    )
    err = capsys.readouterr().err
    assert "moe" in err and "copied" in err  # the bar and the note
    index = json.loads((work / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2
    tensors = {}
    for shard in shards:
        tensors.update(load_file(work / "out" / shard))
    assert set(tensors) == set(index["weight_map"])


def test_all_experts_the_same_model_needs_mergekit_s_flag(work, capsys) -> None:
    config = write_config(
        work,
        experts=[
            {"source_model": "./e0", "positive_prompts": PROMPTS[0]},
            {"source_model": "./e0", "positive_prompts": PROMPTS[1]},
        ],
    )
    err = refused(["moe", config, "out"], capsys, work)
    assert "--i-understand-this-is-not-useful-without-training" in err
    flag = "--i-understand-this-is-not-useful-without-training"
    assert main(["moe", config, "out", "--quiet", flag]) == 0


BAD_CONFIGS = {
    "unknown key": ({"gate_mod": "hidden"}, "gate_mod: unknown key"),
    "missing expert": (
        {
            "experts": [
                {"source_model": "./nope", "positive_prompts": ["a"]},
                {"source_model": "./e1", "positive_prompts": ["b"]},
            ]
        },
        "experts[0].source_model: 'nope': no such model folder",
    ),
    "a model with a LoRA adapter": (
        {
            "experts": [
                {"source_model": "./e0+./e1", "positive_prompts": ["a"]},
                {"source_model": "./e1", "positive_prompts": ["b"]},
            ]
        },
        "experts[0].source_model: './e0+./e1' is a model with a LoRA adapter (MODEL+LORA); "
        "modelfuse moe reads model folders: write the adapted model first (modelfuse merge",
    ),
    "other MLP shape": (
        {
            "experts": [
                {"source_model": "./e0", "positive_prompts": ["a"]},
                {"source_model": "./wide", "positive_prompts": ["b"]},
            ]
        },
        "experts[1].source_model: tensor model.layers.0.mlp.gate_proj.weight has shape [48, 32]",
    ),
    "other architecture": (
        {
            "experts": [
                {"source_model": "./e0", "positive_prompts": ["a"]},
                {"source_model": "./mistral", "positive_prompts": ["b"]},
            ]
        },
        "Mixtral needs one model_type for all models: base_model is 'llama', "
        "experts[1].source_model is 'mistral'; Qwen MoE needs exactly 1 shared expert; "
        "modelfuse moe writes a Mixtral of Llama or Mistral models, or a Qwen2-MoE",
    ),
    "too many per token": ({"experts_per_token": 3}, "3 experts per token but only 2 experts"),
    "no experts per token": ({"experts_per_token": 0}, "experts_per_token: expected at least 1"),
    "empty prompts": (
        {
            "experts": [
                {"source_model": "./e0", "positive_prompts": []},
                {"source_model": "./e1", "positive_prompts": ["b"]},
            ]
        },
        "experts[0]: no positive_prompts; gate_mode hidden",
    ),
    "same prompts": (
        {
            "experts": [
                {"source_model": "./e0", "positive_prompts": ["a"]},
                {"source_model": "./e1", "positive_prompts": ["a"]},
            ]
        },
        "every expert has the same positive and negative prompts",
    ),
    "union tokenizer": (
        {"tokenizer_source": "union"},
        "tokenizer_source: 'union' is not supported",
    ),
    "tokenizer block": (
        {"tokenizer": {"source": "union"}},
        "modelfuse moe copies the base model's tokenizer",
    ),
    "gate mode": ({"gate_mode": "hiden"}, "gate_mode: unknown mode 'hiden'; valid: hidden"),
    "dtype": ({"dtype": "int8"}, "dtype: unknown dtype 'int8'; valid: bfloat16"),
    "deepseek": ({"architecture": "deepseek"}, "DeepSeek MoE"),
    "unknown architecture": (
        {"architecture": "gpt"},
        "names no output architecture; valid: mixtral, qwen",
    ),
    "shared expert in a mixtral": (
        {
            "architecture": "mixtral",
            "shared_experts": [{"source_model": "./e1", "positive_prompts": ["c"]}],
        },
        "Mixtral has no shared experts",
    ),
    "shared expert without prompts": (
        {"shared_experts": [{"source_model": "./e1"}]},
        "mergekit 0.1.5 writes this configuration as a DeepSeek MoE",
    ),
    "two shared experts": (
        {
            "shared_experts": [
                {"source_model": "./e1", "positive_prompts": ["c"]},
                {"source_model": "./e0", "positive_prompts": ["d"]},
            ]
        },
        "Qwen MoE needs exactly 1 shared expert",
    ),
    "config.json transformers refuses": (
        {"base_model": "./heads"},
        "transformers cannot read heads/config.json (The hidden size (32) is not a multiple",
    ),
    "a billion layers claimed": (
        {
            "base_model": "./deep",
            "gate_mode": "random",
            "experts": [{"source_model": "./deep"}, {"source_model": "deep"}],
        },
        "deep/config.json: num_hidden_layers is 1000000000 but deep holds 21 tensors",
    ),
    "a huge hidden size claimed": (
        {
            "base_model": "./wide-claim",
            "gate_mode": "random",
            "experts": [{"source_model": "./wide-claim"}, {"source_model": "wide-claim"}],
        },
        "hidden_size is 1000000000000 but model.embed_tokens.weight has shape [100, 32]",
    ),
    "no tokenizer": ({"base_model": "./bare"}, "base_model: 'bare' has no tokenizer files"),
    "noise not a number": (
        {
            "experts": [
                {"source_model": "./e0", "positive_prompts": ["a"], "noise_scale": "big"},
                {"source_model": "./e1", "positive_prompts": ["b"]},
            ]
        },
        "experts.0.noise_scale",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=list(BAD_CONFIGS))
def test_a_bad_configuration_is_one_line(case, work, capsys) -> None:
    changes, expected = BAD_CONFIGS[case]
    err = refused(["moe", write_config(work, **changes), "out"], capsys, work)
    assert expected in err, err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["moe", "moe.yaml", "out", "--overwrit"], "No such option"),
        (["moe", "moe.yaml", "out", "--random-seed", "-1"], "--random-seed"),
        (["moe", "moe.yaml"], "missing the output folder"),
        (["moe", "moe.yaml", "out", "-o", "out"], "give the output folder once"),
        (["moe", "moe.yaml", "out", "--device", "cuda"], "--device: 'cuda' is not available"),
        (
            ["moe", "moe.yaml", "out", "--out-shard-size", "0"],
            "--out-shard-size: expected a positive",
        ),
        (["moe", "moe.yaml", "base", "--overwrite"], "base: is the base model"),
        (["moe", "moe.yaml", ".", "--overwrite"], "contains the base model"),
        (["moe", "nothing.yaml", "out"], "nothing.yaml: no such configuration file"),
    ],
)
def test_bad_flags_and_outputs_are_one_line(args, expected, work, capsys) -> None:
    write_config(work)
    err = refused(args, capsys, work)
    assert expected in err, err


def test_an_existing_output_needs_overwrite_and_a_merge_file_is_pointed_to_merge(work, capsys):
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("mine")
    err = refused(["moe", write_config(work), "out"], capsys, work)
    assert "out: already exists" in err and "--overwrite" in err
    (work / "merge.yaml").write_text("merge_method: linear\nmodels: [./e0, ./e1]\n")
    err = refused(["moe", "merge.yaml", "out2"], capsys, work)
    assert "run it with modelfuse merge CONFIG OUT" in err
    (work / "merge.yaml").unlink()


def test_ctrl_c_while_writing_leaves_nothing(work, capsys, monkeypatch) -> None:
    import modelfuse.moe.build as build

    real, calls = build._tensor, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "_tensor", interrupted)
    config = write_config(work, gate_mode="random")
    before = sorted(os.listdir(work))
    assert main(["moe", config, "out", "--quiet"]) == 130
    assert capsys.readouterr().err == "modelfuse: interrupted; nothing was written\n"
    assert sorted(os.listdir(work)) == before and len(calls) == 5  # no OUT, no temporary folder


def test_modelfuse_merge_points_a_mergekit_moe_file_here(work, capsys) -> None:
    err = refused(["merge", write_config(work), "out"], capsys, work)
    assert "a mergekit-moe configuration" in err
    assert "run it with modelfuse moe CONFIG OUT" in err


def test_mergekit_s_options_are_accepted_with_one_line_each(work, capsys) -> None:
    from modelfuse.cli.merge import MERGEKIT_ONLY
    from modelfuse.cli.moe import MOE_ONLY

    flags = ["--load-in-4bit", "--load-in-8bit", "--num-threads", "2", "--allow-crimes", "--cuda",
             "--low-cpu-memory", "--lazy-unpickle", "--clone-tensors", "--trust-remote-code",
             "--safe-serialization", "--transformers-cache", "x", "--lora-merge-cache", "y",
             "--lora-merge-dtype", "bfloat16", "--read-to-gpu", "--multi-gpu", "--gpu-rich",
             "--async-write", "--write-threads", "2", "-v"]
    config = write_config(work, gate_mode="random")
    assert main(["moe", config, "out", "--quiet", *flags]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    named = [f for f in flags if f.startswith("-")]
    assert lines == [
        f"modelfuse: {flag} is mergekit's; {MOE_ONLY.get(flag) or MERGEKIT_ONLY[flag]}"
        for flag in named
    ]
    assert (work / "out" / "model.safetensors").is_file()
